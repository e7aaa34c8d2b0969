//! Backend `snowflake_workload_identity`: the broker as Snowflake's OIDC workload-identity
//! issuer. The real `credbroker exchange --out-dir` writes a connections.toml entry, and the
//! real snowflake-connector-python logs in with it against a stand-in of Snowflake's login
//! endpoint that verifies the token on its own (tests/snowflake_login_standin.py: PyJWT against the
//! broker's JWKS over HTTP).

mod common;

use std::process::{Command, Stdio};

use common::{rsa_pem, temp_dir, TempDir, TestApp, POLICIES};
use credbroker::types::sha256_hex;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");
const SUBJECT: &str = "gitlab:platform/orders:ref:main";

const ROLES: &str = r#"
[[role]]
name = "loader"
backend = "snowflake-wif"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
subject = "gitlab:{job_project_path}:ref:{ref}"
user = "SVC_LOADER"
[role.claims]
job_project_path = "platform/orders"
ref_protected = "true"

[[role]]
name = "custom-audience"
backend = "snowflake-custom"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
subject = "gitlab:{job_project_path}:ref:{ref}"
[role.claims]
job_project_path = "platform/orders"
"#;

async fn spawn() -> (TestApp, TempDir) {
    let keys = temp_dir();
    let key = keys.0.join("snowflake-wif.pem");
    std::fs::write(&key, rsa_pem(1)).unwrap();
    let tables = format!(
        "[backends.snowflake-wif]\ntype = \"snowflake_workload_identity\"\naccount = \"ORG-ACCOUNT\"\nsigning_key_file = \"{key}\"\n\n\
         [backends.snowflake-custom]\ntype = \"snowflake_workload_identity\"\naccount = \"ORG-ACCOUNT\"\nsigning_key_file = \"{key}\"\n\
         audience = \"acme.example\"\n",
        key = key.display()
    );
    (TestApp::spawn_full("", &tables, &format!("{POLICIES}{ROLES}"), None).await, keys)
}

fn exchange(app: &TestApp, token: &str, role: &str, out_dir: &std::path::Path) -> Value {
    let output = Command::new(BIN)
        .args(["exchange", "--url", &app.url, "--role", role, "--format", "json", "--out-dir"])
        .arg(out_dir)
        .env("CREDBROKER_ID_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The connector logs in with the entry; the stand-in expects `audience` and `subject`.
fn connector_login(app: &TestApp, audience: &str, subject: &str, connections_file: &std::path::Path, connection: &str) -> (bool, Value) {
    let output = Command::new("python3")
        .arg(common::repo_path("tests/snowflake_login_standin.py"))
        .args([&format!("{}/.well-known/jwks.json", app.url), &app.public_url, audience, subject])
        .arg(connections_file)
        .arg(connection)
        .stdin(Stdio::null())
        .output()
        .expect("python3 with snowflake-connector-python and PyJWT (scripts/test.sh installs them)");
    let seen = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_connector_logs_in_with_the_minted_token_from_its_connections_toml() {
    let (app, _keys) = spawn().await;
    let dir = temp_dir();
    let out = dir.0.join("credentials");
    let job_token = app.issuer.token();
    let reply = exchange(&app, &job_token, "loader", &out);
    let env = &reply["env"];
    let token = reply["credential"]["token"].as_str().unwrap();
    assert_eq!(env["SNOWFLAKE_ACCOUNT"], "ORG-ACCOUNT");
    assert_eq!(env["SNOWFLAKE_USER"], "SVC_LOADER");
    assert_eq!(env["SNOWFLAKE_AUTHENTICATOR"], "WORKLOAD_IDENTITY");
    assert_eq!(env["SNOWFLAKE_WORKLOAD_IDENTITY_PROVIDER"], "OIDC");
    assert_eq!(env["SNOWFLAKE_TOKEN"], token);

    let connections = out.join("loader.connections.toml");
    let (logged_in, seen) = connector_login(&app, "snowflakecomputing.com", SUBJECT, &connections, "loader");
    assert!(logged_in, "{seen}");
    assert_eq!(
        seen["login"],
        json!({"ACCOUNT_NAME": "ORG-ACCOUNT", "LOGIN_NAME": "SVC_LOADER", "AUTHENTICATOR": "WORKLOAD_IDENTITY", "PROVIDER": "OIDC"})
    );
    let claims = &seen["verified"];
    assert_eq!(
        (claims["iss"].as_str(), claims["aud"].as_str(), claims["sub"].as_str()),
        (Some(app.public_url.as_str()), Some("snowflakecomputing.com"), Some(SUBJECT))
    );
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900, "the role's default_ttl");
    let deadline = time::OffsetDateTime::parse(reply["job_deadline"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= deadline.unix_timestamp());

    let row = app.audit_row(reply["issuance_id"].as_str().unwrap()).await;
    assert_eq!(
        (row["decision"].as_str(), row["backend"].as_str(), row["target"].as_str()),
        (Some("issued"), Some("snowflake-wif"), Some("snowflake"))
    );
    assert_eq!(row["credential_sha256"], sha256_hex(token.as_bytes()));
}

/// The stand-in's checks are real: a token for another subject or audience is refused, and a
/// configured audience is what the token carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_refuses_another_subject_or_audience_and_the_audience_is_configurable() {
    let (app, _keys) = spawn().await;
    let dir = temp_dir();
    let out = dir.0.join("credentials");
    exchange(&app, &app.issuer.token(), "loader", &out);
    let connections = out.join("loader.connections.toml");
    let (logged_in, seen) = connector_login(&app, "snowflakecomputing.com", "gitlab:other/project:ref:main", &connections, "loader");
    assert!(!logged_in && seen["refused"].as_str().unwrap().contains("subject"), "{seen}");
    let (logged_in, seen) = connector_login(&app, "acme.example", SUBJECT, &connections, "loader");
    assert!(!logged_in && seen["refused"].as_str().unwrap().to_lowercase().contains("audience"), "{seen}");

    exchange(&app, &app.issuer.token(), "custom-audience", &out);
    let (logged_in, seen) = connector_login(&app, "acme.example", SUBJECT, &out.join("custom-audience.connections.toml"), "custom-audience");
    assert!(logged_in, "{seen}");
    assert_eq!(seen["login"]["LOGIN_NAME"], "", "no user configured, none sent");
}

#[tokio::test]
async fn the_token_lives_no_longer_than_the_job() {
    let (app, _keys) = spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": now + 300})), json!({"role": "loader"})).await;
    assert_eq!(status, 200, "{body}");
    let token = body["credential"]["token"].as_str().unwrap();
    use base64::Engine;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= now + 300, "{claims}");
}

#[tokio::test]
async fn the_token_endpoint_serves_workload_identity_roles() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", job_token.as_str()), ("scope", "loader")];
    let response = app.client.post(format!("{}/oauth/token", app.url)).form(&form).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["issued_token_type"], "urn:ietf:params:oauth:token-type:id_token");
    assert_eq!(body["scope"], "loader");
}

#[test]
fn a_role_without_a_subject_and_a_backend_without_an_account_are_refused_at_load() {
    let dir = temp_dir();
    let key = dir.0.join("key.pem");
    std::fs::write(&key, rsa_pem(1)).unwrap();
    let backend = |extra: &str| format!("[backends.wif]\ntype = \"snowflake_workload_identity\"\nsigning_key_file = \"{}\"\n{extra}", key.display());
    let role = "[[role]]\nname = \"r\"\nbackend = \"wif\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n[role.claims]\nproject_path = \"a/b\"\n";
    std::fs::write(dir.0.join("policies/p.toml"), role).unwrap();
    let error = common::load_offline(&dir.0, &backend("account = \"ORG-ACCOUNT\"")).unwrap_err().to_string();
    assert!(error.contains("subject"), "{error}");
    let error = common::load_offline(&dir.0, &backend("")).unwrap_err().to_string();
    assert!(error.contains("backends.wif.account"), "{error}");
}
