//! Snowflake key-pair JWTs end to end: the real broker (real Postgres, a real OIDC issuer over
//! HTTP) signs JWTs that an independent implementation (tests/snowflake_verify.py: Python
//! `cryptography` computes the public key's fingerprint, PyJWT checks the signature) validates
//! by Snowflake's rules, and the real `snowflake-connector-python` logs in to a `fakesnow`
//! server with nothing but the env output (tests/snowflake_connect.py; PEERS.md).

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestApp;
use serde_json::{json, Value};

const POLICIES: &str = r#"
[[role]]
name = "loader"
backend = "snowflake-org"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "2h"
user = "ci_loader"
warehouse = "CI_WH"
database = "ANALYTICS"
schema = "PUBLIC"
role = "CI_LOADER"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "rotated"
backend = "snowflake-org"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
user = "CI_ROTATED"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "locator"
backend = "snowflake-locator"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
user = "ci_loader"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "hyphenated"
backend = "snowflake-hyphen"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
user = "ci.loader@example.com"
[role.claims]
job_project_path = "platform/orders"
"#;

struct SnowflakeApp {
    app: TestApp,
    keys: common::TempDir,
}

impl SnowflakeApp {
    fn key_file(&self, slot: usize) -> std::path::PathBuf {
        self.keys.0.join(format!("key{slot}.p8"))
    }
}

/// `url`: where connectors should go (a fakesnow server in the connector test).
async fn spawn(url: Option<&str>) -> SnowflakeApp {
    let keys = common::temp_dir();
    for slot in [1, 2] {
        std::fs::write(keys.0.join(format!("key{slot}.p8")), common::rsa_pem(slot)).unwrap();
    }
    let key = |slot: usize| keys.0.join(format!("key{slot}.p8")).display().to_string();
    let url_line = url.map(|u| format!("url = \"{u}\"")).unwrap_or_default();
    let tables = format!(
        r#"
[backends.snowflake-org]
type = "snowflake_keypair"
account = "myorg.analytics"
{url_line}
[backends.snowflake-org.users.CI_LOADER]
private_key = {{ file = "{k1}" }}
[backends.snowflake-org.users.ci_rotated]
private_key = {{ file = "{k1}" }}
private_key_2 = {{ file = "{k2}" }}
active_key = 2

[backends.snowflake-locator]
type = "snowflake_keypair"
account = "xy12345.us-east-2.aws"
max_ttl = "30m"
[backends.snowflake-locator.users.CI_LOADER]
private_key = {{ env = "CREDBROKER_TEST_SNOWFLAKE_KEY_UNSET_{unique}" }}
private_key_2 = {{ file = "{k2}" }}
active_key = 2

[backends.snowflake-hyphen]
type = "snowflake_keypair"
account = "MyOrg-Analytics_EU"
[backends.snowflake-hyphen.users."ci.loader@example.com"]
private_key = {{ file = "{k1}" }}
"#,
        k1 = key(1),
        k2 = key(2),
        unique = uuid::Uuid::new_v4().simple(),
    );
    let app = TestApp::spawn_full("", &tables, POLICIES, None).await;
    SnowflakeApp { app, keys }
}

/// Runs the independent verifier; returns the verified claims or the reason it refused.
fn verify(key_file: &Path, account: &str, user: &str, deadline: i64, token: &str) -> Result<Value, String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg(common::repo_path("tests/snowflake_verify.py"))
        .args([&key_file.display().to_string(), account, user, &deadline.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs PyJWT and cryptography)");
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(serde_json::from_slice::<Value>(&output.stdout).unwrap()["claims"].clone())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn token_of(body: &Value) -> &str {
    body["credential"]["token"].as_str().unwrap_or_else(|| panic!("no token in {body}"))
}

#[tokio::test]
async fn minted_jwts_pass_snowflakes_rules_for_each_account_form() {
    let sf = spawn(None).await;
    let job_token = sf.app.issuer.token();
    let deadline = sf.app.issuer.claims()["exp"].as_i64().unwrap() + 5;

    // Organization.account (SQL form) becomes ORG-ACCOUNT; the user name is upper-cased.
    let (status, headers, body) = sf.app.exchange(&job_token, json!({"role": "loader"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let claims = verify(&sf.key_file(1), "MYORG-ANALYTICS", "CI_LOADER", deadline, token_of(&body)).unwrap();
    assert_eq!(claims["sub"], "MYORG-ANALYTICS.CI_LOADER");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
    let credential = &body["credential"];
    assert_eq!(credential["account"], "myorg.analytics");
    assert_eq!(credential["account_identifier"], "MYORG-ANALYTICS");
    assert_eq!(credential["token_type"], "KEYPAIR_JWT");
    assert_eq!(credential["key_slot"], "RSA_PUBLIC_KEY");
    assert_eq!(credential["url"], "https://myorg-analytics.snowflakecomputing.com");
    assert_eq!(credential["sql_api_headers"]["X-Snowflake-Authorization-Token-Type"], "KEYPAIR_JWT");
    assert!(credential["ttl_rule"].as_str().unwrap().contains("1 h"), "{credential}");
    let env = &body["env"];
    assert_eq!(env["SNOWFLAKE_JWT"], token_of(&body));
    assert_eq!(env["SNOWFLAKE_ACCOUNT"], "myorg.analytics");
    assert_eq!(env["SNOWFLAKE_USER"], "CI_LOADER");
    assert_eq!(env["SNOWFLAKE_AUTHENTICATOR"], "SNOWFLAKE_JWT");
    assert_eq!(env["SNOWFLAKE_WAREHOUSE"], "CI_WH");
    assert_eq!(env["SNOWFLAKE_ROLE"], "CI_LOADER");
    // The JWT is not valid for any other key: the verifier computes the fingerprint itself.
    let wrong_key = verify(&sf.key_file(2), "MYORG-ANALYTICS", "CI_LOADER", deadline, token_of(&body)).unwrap_err();
    assert!(wrong_key.contains("signature"), "{wrong_key}");
    let wrong_account = verify(&sf.key_file(1), "MYORG", "CI_LOADER", deadline, token_of(&body)).unwrap_err();
    assert!(wrong_account.contains("sub is"), "{wrong_account}");

    // The audit row keeps the token's SHA-256 and the key's identity (the iss), never the token.
    let row = sf.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["credential_sha256"], credbroker::types::sha256_hex(token_of(&body).as_bytes()));
    assert_eq!(row["credential_handle"], claims["iss"]);
    assert!(!row.to_string().contains(token_of(&body)));

    // A locator with region and cloud: the region is excluded; the backend's max_ttl caps.
    let (status, _, body) = sf.app.exchange(&sf.app.issuer.token(), json!({"role": "locator", "ttl_seconds": 3600})).await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&sf.key_file(2), "XY12345", "CI_LOADER", deadline, token_of(&body)).unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 1800);
    assert_eq!(body["ttl_seconds"], 1800);
    assert_eq!(body["credential"]["url"], "https://xy12345.us-east-2.aws.snowflakecomputing.com");

    // Already hyphenated with an underscore, and a user name with '.' and '@'.
    let (status, _, body) = sf.app.exchange(&sf.app.issuer.token(), json!({"role": "hyphenated"})).await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&sf.key_file(1), "MYORG-ANALYTICS_EU", "CI.LOADER@EXAMPLE.COM", deadline, token_of(&body)).unwrap();
    assert_eq!(claims["sub"], "MYORG-ANALYTICS_EU.CI.LOADER@EXAMPLE.COM");
}

#[tokio::test]
async fn the_active_key_signs_so_rotation_needs_only_a_config_change() {
    let sf = spawn(None).await;
    let deadline = sf.app.issuer.claims()["exp"].as_i64().unwrap() + 5;
    let (status, _, body) = sf.app.exchange(&sf.app.issuer.token(), json!({"role": "rotated"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credential"]["key_slot"], "RSA_PUBLIC_KEY_2");
    verify(&sf.key_file(2), "MYORG-ANALYTICS", "CI_ROTATED", deadline, token_of(&body)).unwrap();
    assert!(verify(&sf.key_file(1), "MYORG-ANALYTICS", "CI_ROTATED", deadline, token_of(&body)).is_err());
}

#[tokio::test]
async fn exp_is_never_past_an_hour_or_the_job_deadline() {
    let sf = spawn(None).await;
    // A role allowing 2 h still gets at most Snowflake's hour.
    let far = time::OffsetDateTime::now_utc().unix_timestamp() + 4 * 3600;
    let long_job = sf.app.issuer.token_with(json!({"exp": far}));
    let (status, _, body) = sf.app.exchange(&long_job, json!({"role": "loader", "ttl_seconds": 7200})).await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&sf.key_file(1), "MYORG-ANALYTICS", "CI_LOADER", far, token_of(&body)).unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
    assert_eq!(body["ttl_seconds"], 3600);

    // A job with 10 minutes left gets a JWT that ends with it.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let job_token = sf.app.issuer.token_with(json!({"exp": now + 600}));
    let (status, _, body) = sf.app.exchange(&job_token, json!({"role": "loader", "ttl_seconds": 3600})).await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&sf.key_file(1), "MYORG-ANALYTICS", "CI_LOADER", now + 600, token_of(&body)).unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= now + 600, "{claims}");
    // The verifier really enforces the deadline (so the check above can fail).
    assert!(verify(&sf.key_file(1), "MYORG-ANALYTICS", "CI_LOADER", now + 60, token_of(&body)).unwrap_err().contains("deadline"));
}

#[tokio::test]
async fn an_unreadable_key_fails_the_exchange_with_a_clear_reason_and_an_audit_row() {
    let sf = spawn(None).await;
    std::fs::write(sf.key_file(2), "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n").unwrap();
    let (status, _, body) = sf.app.exchange(&sf.app.issuer.token(), json!({"role": "rotated"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    let row = sf.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "failed");
    assert!(row["detail"].as_str().unwrap().contains("encrypted PEM"), "{row}");
}

/// A fakesnow server on a free port, stopped by PID when dropped.
struct Fakesnow {
    child: Child,
    url: String,
    _dir: common::TempDir,
}

impl Fakesnow {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = common::temp_dir();
        let child = Command::new("python3")
            .args(["-m", "fakesnow", "-s", "-p", &port.to_string(), "--host", "127.0.0.1"])
            .current_dir(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fakesnow (scripts/test.sh installs it)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "fakesnow did not listen on {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }
}

impl Drop for Fakesnow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_real_snowflake_connector_logs_in_with_the_env_output() {
    let fakesnow = tokio::task::spawn_blocking(Fakesnow::start).await.unwrap();
    let sf = spawn(Some(&fakesnow.url)).await;
    let (status, _, body) = sf.app.exchange(&sf.app.issuer.token(), json!({"role": "loader"})).await;
    assert_eq!(status, 200, "{body}");
    let env: Vec<(String, String)> = body["env"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(common::repo_path("tests/snowflake_connect.py"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["sum"], 42.0);
    assert_eq!(result["authenticator"], "SNOWFLAKE_JWT");
    drop(fakesnow);
}

fn load(tables: &str, policy: &str) -> anyhow::Result<()> {
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("policies/test.toml"), policy).unwrap();
    std::fs::write(dir.0.join("key.p8"), common::rsa_pem(1)).unwrap();
    common::load_offline(&dir.0, tables)
}

#[test]
fn bad_configuration_and_policies_are_refused_at_load_naming_the_key() {
    let backend = |extra: &str| {
        format!("[backends.sf]\ntype = \"snowflake_keypair\"\naccount = \"acme-prod\"\n{extra}\n[backends.sf.users.CI]\nprivate_key = {{ file = \"key.p8\" }}\n")
    };
    let role = |user: &str| {
        format!(
            "[[role]]\nname = \"r1\"\nbackend = \"sf\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\nuser = \"{user}\"\n[role.claims]\njob_project_path = \"platform/orders\"\n"
        )
    };
    load(&backend(""), &role("ci")).unwrap();
    let cases = [
        (backend("max_ttl = \"2h\""), role("CI"), "backends.sf.max_ttl", "exceeds 1h"),
        (backend("").replace("acme-prod", "acme prod"), role("CI"), "backends.sf.account", "not a Snowflake account"),
        (backend("").replace("account = \"acme-prod\"\n", ""), role("CI"), "backends.sf.account", "is required"),
        (backend("").replace("private_key =", "active_key = 2\nprivate_key ="), role("CI"), "private_key_2", "is required"),
        (backend("").replace("private_key =", "active_key = 3\nprivate_key ="), role("CI"), "active_key", "must be 1"),
        (backend("").replace("{ file = \"key.p8\" }", "{ vault_kv = \"sf/ci\", key = \"pem\" }"), role("CI"), "private_key", "[vault]"),
        (backend(""), role("OTHER"), "key `user`", "holds no key for Snowflake user"),
        (backend(""), role("ci-{project_path}"), "key `user`", "allow_claims_in"),
    ];
    for (tables, policy, key, message) in cases {
        let error = format!("{:#}", load(&tables, &policy).unwrap_err());
        assert!(error.contains(key) && error.contains(message), "{key} / {message}: {error}");
    }
}
