//! Vault end to end: the real broker (real Postgres, a real OIDC issuer over HTTP) talking
//! through its production `vaultrs` client to a Vault stand-in that follows Vault's documented
//! HTTP API (tests/common/vault_standin.rs; no Vault server can run here, see PEERS.md).

mod common;

use std::time::{Duration, Instant};

use common::vault_standin::{DbRole, VaultStandin, ROLE_ID, SECRET_ID};
use common::{TempDir, TestApp};
use serde_json::{json, Value};

const TRANSIT_KEY: &str = "credbroker-kafka";

const VAULT_POLICIES: &str = r#"
[[role]]
name = "snowflake-ci"
backend = "snowflake"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-reader"
account = "ACME-PROD"
warehouse = "CI_WH"
database = "ANALYTICS"
role = "CI_READER"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "snowflake-keypair"
backend = "snowflake"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-keypair"
account = "ACME-PROD"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "snowflake-fixed"
backend = "snowflake"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-fixed"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "snowflake-templated"
backend = "snowflake"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-{job_project_path}"
vault_role_template = "sanitise"
[role.claims]
job_project_path = "platform/*"

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
"#;

struct VaultApp {
    app: TestApp,
    vault: VaultStandin,
    _secrets: TempDir,
}

fn vault_tables(address: &str, secret_id_file: &std::path::Path) -> String {
    let approle = format!("[vault.approle]\nrole_id = \"{ROLE_ID}\"\nsecret_id_file = \"{}\"\n", secret_id_file.display());
    vault_tables_with_auth(address, &approle)
}

/// The Vault section with `auth` (a `[vault.<method>]` table) and the Vault-backed backends.
fn vault_tables_with_auth(address: &str, auth: &str) -> String {
    format!(
        r#"
[vault]
address = "{address}"
namespace = "platform"
request_timeout_seconds = 5

{auth}

[backends.snowflake]
type = "vault_database"

[backends.kafka-vault]
type = "kafka_oauthbearer"
audience = "kafka-test"
max_ttl = "1h"
signing = {{ vault_transit = "{TRANSIT_KEY}", refresh_seconds = 1 }}
"#
    )
}

/// A stand-in with the Snowflake roles and the transit key, and the broker logged in to it.
async fn spawn() -> VaultApp {
    let vault = VaultStandin::start().await;
    let role = |default_ttl, max_ttl, renewable, key_pair| DbRole { default_ttl, max_ttl, renewable, key_pair };
    vault.add_db_role("ci-reader", role(3600, 86400, true, false));
    vault.add_db_role("ci-keypair", role(3600, 86400, true, true));
    vault.add_db_role("ci-fixed", role(3600, 3600, false, false));
    vault.add_db_role("ci-platform-orders", role(3600, 86400, true, false));
    vault.rotate_transit_key(TRANSIT_KEY, common::rsa_pem(1));
    spawn_against(vault.clone(), &vault.url).await
}

async fn spawn_against(vault: VaultStandin, address: &str) -> VaultApp {
    let secrets = common::temp_dir();
    let secret_id_file = secrets.0.join("vault-secret-id");
    std::fs::write(&secret_id_file, format!("{SECRET_ID}\n")).unwrap();
    let app = TestApp::spawn_full("", &vault_tables(address, &secret_id_file), VAULT_POLICIES, None).await;
    VaultApp { app, vault, _secrets: secrets }
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = app.client.get(format!("{}/readyz", app.url)).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn approle_login_renews_the_token_and_logs_in_again_when_it_dies() {
    let vault = VaultStandin::start().await;
    vault.add_db_role("ci-reader", DbRole { default_ttl: 3600, max_ttl: 86400, renewable: true, key_pair: false });
    vault.with(|s| s.token_ttl = 3);
    let VaultApp { app, vault, _secrets } = spawn_against(vault.clone(), &vault.url).await;
    assert_eq!(vault.with(|s| s.logins), 1, "logged in at startup");
    assert!(vault.with(|s| s.namespaces.iter().all(|ns| ns == "platform") && !s.namespaces.is_empty()), "namespace header sent");
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["vault"], "ok");

    // Renewed at two thirds of the 3 s TTL, without a new login.
    eventually("a token renewal", Duration::from_secs(6), || vault.with(|s| s.renewals) >= 1).await;
    assert_eq!(vault.with(|s| s.logins), 1);

    // The token dies (revoked, or Vault lost it): the next renewal fails and the broker logs in again.
    vault.revoke_all_tokens();
    eventually("a fresh login", Duration::from_secs(8), || vault.with(|s| s.logins) >= 2).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci"})).await;
    assert_eq!(status, 200, "{body}");

    // A token that dies between renewals is noticed by the request itself: one login, one retry.
    vault.revoke_all_tokens();
    let logins = vault.with(|s| s.logins);
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(vault.with(|s| s.logins) > logins);
}

#[tokio::test]
async fn snowflake_user_from_vault_with_the_lease_shortened_to_the_granted_ttl() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    let token = app.issuer.token();
    let (status, headers, body) = app.exchange(&token, json!({"role": "snowflake-ci", "ttl_seconds": 600})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["target"], "snowflake");
    assert_eq!(body["backend"], "snowflake");
    let credential = &body["credential"];
    let lease_id = credential["lease_id"].as_str().unwrap().to_owned();
    assert!(lease_id.starts_with("database/creds/ci-reader/"), "{lease_id}");
    let password = credential["password"].as_str().unwrap().to_owned();
    let username = credential["username"].as_str().unwrap();
    assert_eq!(vault.with(|s| s.leases[&lease_id].username.clone()), username);
    assert_eq!(credential["account"], "ACME-PROD");
    assert_eq!(credential["warehouse"], "CI_WH");
    assert_eq!(credential["database"], "ANALYTICS");
    assert_eq!(credential["role"], "CI_READER");
    let env = &body["env"];
    assert_eq!(env["SNOWFLAKE_USER"], username);
    assert_eq!(env["SNOWFLAKE_PASSWORD"], password.as_str());
    assert_eq!(env["SNOWFLAKE_ACCOUNT"], "ACME-PROD");
    assert_eq!(env["SNOWFLAKE_WAREHOUSE"], "CI_WH");
    assert_eq!(env["SNOWFLAKE_DATABASE"], "ANALYTICS");
    assert_eq!(env["SNOWFLAKE_ROLE"], "CI_READER");

    // Vault granted 1 h; the broker shortened the lease to what it granted, counted from now.
    let renewals = vault.with(|s| s.lease_renewals.clone());
    assert_eq!(renewals.len(), 1);
    assert_eq!(renewals[0].0, lease_id);
    assert!((598..=600).contains(&renewals[0].1), "increment {}", renewals[0].1);
    let vault_ttl = vault.with(|s| s.leases[&lease_id].expires.saturating_duration_since(Instant::now()).as_secs());
    assert!((595..=600).contains(&vault_ttl), "Vault's lease now ends in {vault_ttl} s");
    assert!((598..=600).contains(&credential["lease_duration_seconds"].as_u64().unwrap()));
    assert_eq!(body["ttl_seconds"], 600);

    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["credential_handle"], lease_id.as_str());
    assert_eq!(row["credential_sha256"], credbroker::types::sha256_hex(password.as_bytes()));
    assert!(!row.to_string().contains(&password), "no password in the audit row");
}

#[tokio::test]
async fn a_lease_vault_caps_below_the_request_is_reported_as_vault_set_it() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    vault.add_db_role("ci-reader", DbRole { default_ttl: 300, max_ttl: 300, renewable: true, key_pair: false });
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci", "ttl_seconds": 900})).await;
    assert_eq!(status, 200, "{body}");
    let ttl = body["ttl_seconds"].as_i64().unwrap();
    assert!((298..=300).contains(&ttl), "Vault's 300 s, not the requested 900: {ttl}");
    assert!(vault.with(|s| s.lease_renewals.is_empty()), "a lease already shorter needs no renewal");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["granted_ttl_seconds"], ttl);
    let expires_at = time::OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    let from_now = (expires_at - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!((295..=300).contains(&from_now), "{from_now}");
}

#[tokio::test]
async fn a_lease_vault_will_not_shorten_is_revoked_at_the_deadline() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = app.issuer.token_with(json!({"exp": now + 4}));
    let (status, _, body) = app.exchange(&token, json!({"role": "snowflake-fixed"})).await;
    assert_eq!(status, 200, "{body}");
    let lease_id = body["credential"]["lease_id"].as_str().unwrap().to_owned();
    let ttl = body["ttl_seconds"].as_i64().unwrap();
    assert!((3..=4).contains(&ttl), "bounded by the job, got {ttl}");
    assert_eq!(vault.with(|s| s.lease_renewals.len()), 1, "shortening was attempted");
    assert!(vault.with(|s| s.leases[&lease_id].revoked_at.is_none()), "still alive before the deadline");

    eventually("revocation at the deadline", Duration::from_secs(10), || {
        vault.with(|s| s.leases[&lease_id].revoked_at.is_some())
    })
    .await;
    let revoked_at = vault.with(|s| s.leases[&lease_id].revoked_at.unwrap());
    let expires_at = time::OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    assert!(revoked_at >= expires_at - time::Duration::milliseconds(500), "not before the deadline: {revoked_at} vs {expires_at}");
}

#[tokio::test]
async fn key_pair_users_reach_the_cli_as_snowflake_variables() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    let (url, token) = (app.url.clone(), app.issuer.token());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["exchange", "--url", &url, "--role", "snowflake-keypair", "--format", "env", "--token-env", "JOB_TOKEN"])
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
    assert!(stdout.contains("export SNOWFLAKE_USER='V_APPROLE_CI_KEYPAIR_"), "{stdout}");
    assert!(!stdout.contains("SNOWFLAKE_PASSWORD"), "{stdout}");
    let lease = vault.with(|s| s.leases.keys().find(|id| id.starts_with("database/creds/ci-keypair/")).cloned()).unwrap();
    let row: Value = sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(row["credential_handle"], lease.as_str());
    assert!(!row.to_string().contains("PRIVATE KEY"), "no key in the audit row");
}

#[tokio::test]
async fn a_templated_vault_role_is_rendered_and_sanitised() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-templated"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["credential"]["lease_id"].as_str().unwrap().starts_with("database/creds/ci-platform-orders/"));
    assert_eq!(vault.with(|s| s.leases.values().filter(|l| l.role == "ci-platform-orders").count()), 1);
}

async fn assert_backend_failed(app: &TestApp, role: &str, expected_detail: &str) {
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": role})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(expected_detail), "{detail}");
    assert!(!detail.contains("hvs."), "never a Vault token in a detail: {detail}");
    assert!(body.get("credential").is_none());
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "failed");
    assert_eq!(row["code"], "backend_failed");
    assert!(row["detail"].as_str().unwrap().contains(expected_detail));
}

#[tokio::test]
async fn permission_denied_and_a_sealed_vault_are_backend_failures_with_vaults_message() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    vault.with(|s| s.denied_prefixes.push("database/creds/".into()));
    assert_backend_failed(&app, "snowflake-ci", "Vault answered 403 to GET database/creds/ci-reader: permission denied").await;
    assert!(vault.with(|s| s.leases.is_empty()));

    vault.with(|s| {
        s.denied_prefixes.clear();
        s.sealed = true;
    });
    assert_backend_failed(&app, "snowflake-ci", "Vault is sealed").await;
    assert_backend_failed(&app, "kafka-vault", "Vault is sealed").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert!(body["checks"]["vault"].as_str().unwrap().contains("503"), "{body}");

    vault.with(|s| s.sealed = false);
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci"})).await;
    assert_eq!(status, 200, "unsealed again: {body}");
}

#[tokio::test]
async fn an_unreachable_vault_is_a_502_with_a_failed_row_and_no_credential() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let vault = VaultStandin::start().await;
    let VaultApp { app, _secrets, .. } = spawn_against(vault, &format!("http://{closed}")).await;
    assert_backend_failed(&app, "snowflake-ci", "unreachable").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["checks"]["vault"].as_str().unwrap().starts_with("unreachable"), "{body}");
}

#[tokio::test]
async fn wrong_approle_credentials_leave_the_broker_unauthenticated() {
    let vault = VaultStandin::start().await;
    let secrets = common::temp_dir();
    let secret_id_file = secrets.0.join("vault-secret-id");
    std::fs::write(&secret_id_file, "not-the-secret-id").unwrap();
    let app = TestApp::spawn_full("", &vault_tables(&vault.url, &secret_id_file), VAULT_POLICIES, None).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    let check = body["checks"]["vault"].as_str().unwrap();
    assert!(check.starts_with("unauthenticated") && check.contains("invalid role or secret ID"), "{check}");
    assert!(!check.contains("not-the-secret-id"), "the secret id never appears: {check}");
    assert_backend_failed(&app, "snowflake-ci", "approle").await;
}

#[tokio::test]
async fn kafka_tokens_signed_by_vault_transit_verify_across_a_key_rotation() {
    let VaultApp { app, vault, _secrets } = spawn().await;
    let (status, _, first) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
    assert_eq!(status, 200, "{first}");
    let first_token = first["credential"]["token"].as_str().unwrap().to_owned();
    let first_kid = first["credential"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(vault.with(|s| s.sign_requests.last().cloned()), Some((TRANSIT_KEY.to_owned(), Some(1))));

    // Rotate in Vault; the broker picks up version 2 within refresh_seconds.
    vault.rotate_transit_key(TRANSIT_KEY, common::rsa_pem(0));
    let jwks_url = format!("{}/.well-known/jwks.json", app.url);
    let deadline = Instant::now() + Duration::from_secs(8);
    let second = loop {
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
        assert_eq!(status, 200, "{body}");
        if body["credential"]["key_id"] != first_kid.as_str() {
            break body;
        }
        assert!(Instant::now() < deadline, "the rotated key was never used");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(vault.with(|s| s.sign_requests.last().cloned()), Some((TRANSIT_KEY.to_owned(), Some(2))));
    let second_token = second["credential"]["token"].as_str().unwrap().to_owned();

    let jwks: Value = reqwest::get(&jwks_url).await.unwrap().json().await.unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().filter_map(|k| k["kid"].as_str()).collect();
    assert!(kids.contains(&first_kid.as_str()), "the old version stays published while its tokens live: {kids:?}");
    assert!(kids.contains(&second["credential"]["key_id"].as_str().unwrap()));

    let issuer = app.public_url.clone();
    let (old, new) = tokio::task::spawn_blocking(move || {
        let validate = |token: &str| common::kip768_validate(&jwks_url, "kafka-test", &issuer, token);
        (validate(&first_token), validate(&second_token))
    })
    .await
    .unwrap();
    for output in [old, new] {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(verdict, json!({"principal": "ci:platform/orders", "scope": ["orders.write"]}));
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

#[tokio::test]
async fn secret_sources_read_files_environment_and_vault_kv_with_caching_and_rotation() {
    use credbroker::vault::secret_source::{self, SecretSource, VaultKvSecret};
    use secrecy::ExposeSecret;
    let standin = VaultStandin::start().await;
    standin.put_kv("looker/admin", json!({"client_id": "looker-admin", "client_secret": "first-secret"}));
    let table: toml::Table = format!(
        "address = \"{}\"\n[approle]\nrole_id = \"{ROLE_ID}\"\nsecret_id_env = \"CREDBROKER_TEST_VAULT_SECRET_ID\"\n",
        standin.url
    )
    .parse()
    .unwrap();
    // Set once, before any thread reads the environment; nextest runs each test in its own process.
    std::env::set_var("CREDBROKER_TEST_VAULT_SECRET_ID", SECRET_ID);
    let config = credbroker::vault::VaultConfig::parse(&table, "test.toml", std::path::Path::new("/")).unwrap();
    let vault = credbroker::vault::Vault::new(config).unwrap();

    let cached = VaultKvSecret::new(vault.clone(), "secret", "looker/admin", "client_secret", Duration::from_secs(60));
    assert_eq!(cached.read().await.unwrap().expose_secret(), "first-secret");
    assert_eq!(cached.cached_version(), Some(1));
    standin.put_kv("looker/admin", json!({"client_id": "looker-admin", "client_secret": "rotated-secret"}));
    assert_eq!(cached.read().await.unwrap().expose_secret(), "first-secret", "served from the cache");
    cached.invalidate();
    assert_eq!(cached.read().await.unwrap().expose_secret(), "rotated-secret", "re-read after rotation");
    assert_eq!(cached.cached_version(), Some(2));
    let uncached = VaultKvSecret::new(vault.clone(), "secret", "looker/admin", "client_secret", Duration::ZERO);
    standin.put_kv("looker/admin", json!({"client_secret": "third-secret"}));
    assert_eq!(uncached.read().await.unwrap().expose_secret(), "third-secret");

    let missing = VaultKvSecret::new(vault.clone(), "secret", "looker/admin", "nope", Duration::ZERO);
    let error = missing.read().await.unwrap_err().to_string();
    assert!(error.contains("vault kv secret/looker/admin#nope") && !error.contains("third-secret"), "{error}");
    let absent = VaultKvSecret::new(vault.clone(), "secret", "looker/gone", "x", Duration::ZERO);
    assert!(absent.read().await.unwrap_err().to_string().contains("404"));

    // The same sources parsed from a backend table.
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("key.pem"), "file-secret\n").unwrap();
    let parse = |text: &str| {
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("s = {text}")).unwrap()["s"].clone();
        secret_source::parse(&value, "test.toml", "backends.looker.admin_client_secret", &dir.0, Some(&vault))
    };
    assert_eq!(parse("{ file = \"key.pem\" }").unwrap().read().await.unwrap().expose_secret(), "file-secret");
    assert_eq!(parse("{ env = \"CREDBROKER_TEST_VAULT_SECRET_ID\" }").unwrap().read().await.unwrap().expose_secret(), SECRET_ID);
    let kv = parse("{ vault_kv = \"looker/admin\", key = \"client_secret\", cache_seconds = 0 }").unwrap();
    assert_eq!(kv.read().await.unwrap().expose_secret(), "third-secret");
    for (bad, key) in [
        ("\"inline\"", "backends.looker.admin_client_secret"),
        ("{ vault_kv = \"looker/admin\" }", "admin_client_secret.key"),
        ("{ file = \"a\", env = \"B\" }", "admin_client_secret.env"),
        ("{ vault_kv = \"p\", key = \"k\", cache_seconds = -1 }", "admin_client_secret.cache_seconds"),
    ] {
        let error = parse(bad).err().unwrap().to_string();
        assert!(error.contains(&format!("{key}`")), "{bad}: {error}");
    }
}

/// The Kubernetes and JWT methods log in with the token file's content, and read the file again
/// at every login: a projected service-account token or a CI-issued JWT is replaced on disk
/// while the broker runs, and the old one stops validating.
#[tokio::test]
async fn kubernetes_and_jwt_logins_send_the_token_file_and_read_it_again_at_each_login() {
    // (method, mount the stand-in serves, `mount = ` line or none for the method's default)
    for (method, mount, mount_line) in [("kubernetes", "k8s-prod", "mount = \"k8s-prod\"\n"), ("jwt", "jwt", "")] {
        let vault = VaultStandin::start().await;
        vault.add_db_role("ci-reader", DbRole { default_ttl: 3600, max_ttl: 86400, renewable: true, key_pair: false });
        vault.set_jwt_mount(mount, method, "credbroker", "eyJ.first-token.sig");
        let secrets = common::temp_dir();
        let token_file = secrets.0.join("vault-login.jwt");
        std::fs::write(&token_file, "eyJ.first-token.sig\n").unwrap();
        let auth = format!("[vault.{method}]\n{mount_line}role = \"credbroker\"\ntoken_file = \"{}\"\n", token_file.display());
        let app = TestApp::spawn_full("", &vault_tables_with_auth(&vault.url, &auth), VAULT_POLICIES, None).await;

        let expected = |jwt: &str| (mount.to_owned(), Some("credbroker".to_owned()), jwt.to_owned());
        assert_eq!(vault.with(|s| s.jwt_logins.clone()), vec![expected("eyJ.first-token.sig")], "{method}: logged in at startup");
        let (status, body) = readyz(&app).await;
        assert_eq!(status, 200, "{method}: {body}");
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci"})).await;
        assert_eq!(status, 200, "{method}: {body}");

        // The token on disk is replaced and the old one no longer validates; the Vault token dies.
        std::fs::write(&token_file, "eyJ.second-token.sig\n").unwrap();
        vault.set_jwt_mount(mount, method, "credbroker", "eyJ.second-token.sig");
        vault.revoke_all_tokens();
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "snowflake-ci"})).await;
        assert_eq!(status, 200, "{method}: logged in again with the new file content: {body}");
        assert_eq!(vault.with(|s| s.jwt_logins.last().cloned()), Some(expected("eyJ.second-token.sig")), "{method}");
        assert_eq!(vault.with(|s| s.logins), 2, "{method}");

        // A token Vault rejects: the broker fails with Vault's own message, never the token.
        vault.set_jwt_mount(mount, method, "credbroker", "eyJ.third-token.sig");
        vault.revoke_all_tokens();
        let message = if method == "kubernetes" { "permission denied" } else { "error validating token" };
        assert_backend_failed(&app, "snowflake-ci", message).await;
        let (status, body) = readyz(&app).await;
        assert_eq!(status, 503, "{method}: {body}");
        let check = body["checks"]["vault"].as_str().unwrap();
        assert!(check.contains(message) && !check.contains("second-token"), "{method}: {check}");
    }
}

/// An `ecdsa-p256` transit key signs ES256 tokens: the broker asks Vault for
/// `marshaling_algorithm = jws` (Vault's default, DER, is not what a JWT carries), and an
/// independent verifier (PyJWT) accepts them against the broker's JWKS.
#[tokio::test]
async fn kafka_tokens_signed_by_an_ecdsa_transit_key_verify_as_es256() {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let vault = VaultStandin::start().await;
    vault.rotate_transit_key(TRANSIT_KEY, common::rsa_pem(1));
    let ecdsa_key = p256::SecretKey::random(&mut rand::rngs::OsRng).to_pkcs8_pem(LineEnding::LF).unwrap();
    vault.rotate_transit_ecdsa_key("credbroker-kafka-es", &ecdsa_key);
    let secrets = common::temp_dir();
    let secret_id_file = secrets.0.join("vault-secret-id");
    std::fs::write(&secret_id_file, format!("{SECRET_ID}\n")).unwrap();
    let tables = format!(
        "{}\n[backends.kafka-es]\ntype = \"kafka_oauthbearer\"\naudience = \"kafka-test\"\nmax_ttl = \"1h\"\nsigning = {{ vault_transit = \"credbroker-kafka-es\" }}\n",
        vault_tables(&vault.url, &secret_id_file)
    );
    let policies = format!(
        "{VAULT_POLICIES}\n[[role]]\nname = \"kafka-es\"\nbackend = \"kafka-es\"\nissuer = \"gitlab\"\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n\
         principal = \"ci:{{job_project_path}}\"\nscope = \"orders.write\"\n[role.claims]\njob_project_path = \"platform/orders\"\n"
    );
    let app = TestApp::spawn_full("", &tables, &policies, None).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-es"})).await;
    assert_eq!(status, 200, "{body}");
    let token = body["credential"]["token"].as_str().unwrap().to_owned();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(vault.with(|s| s.sign_requests.last().cloned()), Some(("credbroker-kafka-es".to_owned(), Some(1))));

    let jwks_url = format!("{}/.well-known/jwks.json", app.url);
    let jwks: Value = reqwest::get(&jwks_url).await.unwrap().json().await.unwrap();
    let published = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == header.kid.clone().unwrap().as_str()).cloned();
    assert_eq!(published.as_ref().map(|k| (k["kty"].clone(), k["crv"].clone())), Some((json!("EC"), json!("P-256"))), "{jwks}");

    let issuer = app.public_url.clone();
    let output = tokio::task::spawn_blocking(move || common::kip768_validate(&jwks_url, "kafka-test", &issuer, &token)).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdict, json!({"principal": "ci:platform/orders", "scope": ["orders.write"]}));
}
