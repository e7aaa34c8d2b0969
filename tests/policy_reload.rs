//! Policy reload without a restart (`POST /v1/policies/reload`, `SIGHUP`), and the policy
//! version every audit row records: the same SHA-256 `credbroker policy check` prints for the
//! files on disk. Real Postgres, a real OIDC issuer, the broker in-process and as the binary.

mod common;

use std::time::Duration;

use common::{eventually, TestApp};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

const POLICIES: &str = r#"
[admins]
issuer = "gitlab"
[admins.claims]
project_path = "security/credbroker-admin"

[auditors]
issuer = "gitlab"
[auditors.claims]
project_path = "security/credbroker-admin"

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

const CONSUMER: &str = r#"
[[role]]
name = "orders-consumer"
backend = "kafka"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
principal = "ci:{job_project_path}"
[role.claims]
job_project_path = "platform/orders"
"#;

/// What `credbroker policy check DIR` prints as `policy version <hex>`.
fn checked_version(dir: &std::path::Path) -> String {
    let output = std::process::Command::new(BIN).args(["policy", "check"]).arg(dir).env_remove("CREDBROKER_CONFIG").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let version = stdout.lines().find_map(|line| line.strip_prefix("policy version ")).unwrap_or_else(|| panic!("{stdout}")).to_owned();
    assert!(version.len() == 64 && version.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{version}");
    version
}

fn admin_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": "security/credbroker-admin", "user_login": "sec-oncall"}))
}

async fn reload(app: &TestApp, token: &str) -> (u16, Value) {
    let response = app.client.post(format!("{}/v1/policies/reload", app.url)).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn issue(app: &TestApp, role: &str) -> (u16, Value) {
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({ "role": role })).await;
    (status, body)
}

#[tokio::test]
async fn a_reload_swaps_the_set_and_every_row_names_the_version_that_decided_it() {
    let app = TestApp::spawn_full("", "", POLICIES, None).await;
    let policy_dir = app.dir.0.join("policies");
    let first = checked_version(&policy_dir);
    let (status, body) = issue(&app, "orders-producer").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.audit_row(body["issuance_id"].as_str().unwrap()).await["policy_version"], first.as_str());
    assert_eq!(issue(&app, "orders-consumer").await.0, 403, "not in the loaded set yet");

    std::fs::write(policy_dir.join("consumer.toml"), CONSUMER).unwrap();
    let second = checked_version(&policy_dir);
    assert_ne!(first, second);
    let (status, body) = reload(&app, &admin_token(&app)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "policy_version": second }));
    let (status, body) = issue(&app, "orders-consumer").await;
    assert_eq!(status, 200, "served by the reloaded set: {body}");
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    assert_eq!(app.audit_row(&issuance_id).await["policy_version"], second.as_str());

    let requests: Vec<String> = sqlx::query_scalar("select detail from audit_events where decision = 'admin_request' and target = 'policy_reload'")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].contains(&format!("version {first} replaced by {second}")) && requests[0].contains("sec-oncall"), "{requests:?}");

    // The security team reads it back from the API.
    let response = app.client.get(format!("{}/v1/issuances/{issuance_id}", app.url)).bearer_auth(admin_token(&app)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let record: Value = response.json().await.unwrap();
    assert_eq!(record["issuance"]["policy_version"], second.as_str(), "{record}");
    let response = app.client.get(format!("{}/v1/issuances?role=orders-consumer", app.url)).bearer_auth(admin_token(&app)).send().await.unwrap();
    let listed: Value = response.json().await.unwrap();
    assert_eq!(listed["items"][0]["policy_version"], second.as_str(), "{listed}");
}

#[tokio::test]
async fn a_set_that_does_not_compile_is_refused_and_the_loaded_one_keeps_serving() {
    let app = TestApp::spawn_full("", "", POLICIES, None).await;
    let policy_dir = app.dir.0.join("policies");
    let serving = checked_version(&policy_dir);
    std::fs::write(policy_dir.join("broken.toml"), CONSUMER.replace("default_ttl = \"15m\"", "default_ttl = \"soon\"")).unwrap();

    let (status, problem) = reload(&app, &admin_token(&app)).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["code"], "policy_invalid");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("broken.toml") && detail.contains("orders-consumer") && detail.contains("default_ttl"), "{detail}");
    let row = app.audit_row(problem["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["code"].as_str()), (Some("failed"), Some("policy_invalid")), "{row}");

    let (status, body) = issue(&app, "orders-producer").await;
    assert_eq!(status, 200, "the loaded set still serves: {body}");
    assert_eq!(app.audit_row(body["issuance_id"].as_str().unwrap()).await["policy_version"], serving.as_str());
    let ready: Value = app.client.get(format!("{}/readyz", app.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    let check = ready["checks"]["policies"].as_str().unwrap();
    assert!(check.contains(&serving) && check.contains("last reload failed") && check.contains("broken.toml"), "{check}");

    // Not an admin: refused like the other admin endpoints, and nothing reloads.
    std::fs::remove_file(policy_dir.join("broken.toml")).unwrap();
    let (status, problem) = reload(&app, &app.issuer.token()).await;
    assert_eq!((status, problem["code"].as_str()), (403, Some("access_denied")), "{problem}");
    let response = app.client.post(format!("{}/v1/policies/reload", app.url)).send().await.unwrap();
    assert_eq!(response.status(), 401);

    // Fixed: the next reload clears the complaint.
    let (status, _) = reload(&app, &admin_token(&app)).await;
    assert_eq!(status, 200);
    let ready: Value = app.client.get(format!("{}/readyz", app.url)).send().await.unwrap().json().await.unwrap();
    assert!(!ready["checks"]["policies"].as_str().unwrap().contains("failed"), "{ready}");

    // The failure and the recovery, where monitoring sees them.
    let metrics = app.client.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("credbroker_policy_reloads_total{outcome=\"failed\"} 1\n"), "{metrics}");
    assert!(metrics.contains("credbroker_policy_reloads_total{outcome=\"ok\"} 1\n"), "{metrics}");
}

/// The real binary reloads on SIGHUP.
#[tokio::test]
async fn sighup_reloads_a_running_broker() {
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), POLICIES).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, common::config_text(&issuer.url, &database_url, &url, "")).unwrap();
    let log = dir.0.join("broker.log");
    let broker = common::start_binary(&config, port, &log).await;
    let client = reqwest::Client::new();
    let issue = async |role: &str| {
        let response = client.post(format!("{url}/v1/credentials")).bearer_auth(issuer.token()).json(&json!({ "role": role })).send().await.unwrap();
        response.status().as_u16()
    };
    assert_eq!(issue("orders-consumer").await, 403);
    std::fs::write(dir.0.join("policies/consumer.toml"), CONSUMER).unwrap();
    // SAFETY: a signal to the child process this test started.
    unsafe { libc::kill(broker.0.id() as i32, libc::SIGHUP) };
    eventually("the reloaded role", Duration::from_secs(10), async || issue("orders-consumer").await == 200).await;
    let expected = checked_version(&dir.0.join("policies"));
    let ready: Value = client.get(format!("{url}/readyz")).send().await.unwrap().json().await.unwrap();
    assert!(ready["checks"]["policies"].as_str().unwrap().contains(&expected), "{ready}");
}

/// `policy check --format codequality`: GitLab's Code Quality report on stdout, so a broken
/// policy shows in the merge request: an empty array and success for a good set; for a bad one
/// an entry naming the file (relative to the working directory) and the offending key's line,
/// and a failing exit status.
#[test]
fn policy_check_writes_a_gitlab_code_quality_report() {
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("policies/test.toml"), POLICIES).unwrap();
    let check = || {
        std::process::Command::new(BIN)
            .args(["policy", "check", "policies", "--format", "codequality"])
            .current_dir(&dir.0)
            .env_remove("CREDBROKER_CONFIG")
            .output()
            .unwrap()
    };
    let good = check();
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&good.stdout).unwrap(), json!([]));

    std::fs::write(dir.0.join("policies/consumer.toml"), CONSUMER.replace("max_ttl = \"1h\"", "max_ttl = \"forever\"")).unwrap();
    let bad = check();
    assert!(!bad.status.success());
    let report: Value = serde_json::from_slice(&bad.stdout).unwrap();
    let issues = report.as_array().unwrap();
    assert_eq!(issues.len(), 1, "{report}");
    let issue = &issues[0];
    assert_eq!(issue["location"]["path"], "policies/consumer.toml");
    let line = CONSUMER.lines().position(|line| line.starts_with("max_ttl")).unwrap() + 1;
    assert_eq!(issue["location"]["lines"]["begin"], line, "{issue}");
    assert!(issue["description"].as_str().unwrap().contains("max_ttl"), "{issue}");
    assert_eq!(issue["check_name"], "credbroker-policy");
    assert_eq!(issue["severity"], "major");
    assert_eq!(issue["fingerprint"].as_str().unwrap().len(), 64);
}
