//! The binary as users run it: `serve --dev`, `dev token`, `exchange`, `audit tail`,
//! `policy explain`, and the guarantee that no secret reaches the broker's log.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Broker {
    child: std::process::Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credbroker(config: &std::path::Path, env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.arg("--config").arg(config).args(args).stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn dev_mode_exchange_through_the_cli_leaves_no_secret_in_the_log() {
    let dir = common::temp_dir();
    let database_url = common::fresh_database().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, std::fs::read_to_string(common::repo_path("dev/credbroker.toml")).unwrap().replace("../.credbroker-dev", "state"))
        .unwrap();
    std::fs::create_dir_all(dir.0.join("policies")).unwrap();
    std::fs::copy(common::repo_path("dev/policies/demo.toml"), dir.0.join("policies/demo.toml")).unwrap();
    let env = vec![
        ("CREDBROKER_DATABASE_URL", database_url.clone()),
        ("CREDBROKER_LISTEN", format!("127.0.0.1:{port}")),
        ("CREDBROKER_PUBLIC_URL", base.clone()),
    ];

    // Without --dev, a config with a [dev] section is refused, naming the key.
    let refused = credbroker(&config, &env, &["serve"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("key `dev`"), "{}", String::from_utf8_lossy(&refused.stderr));

    let log = dir.0.join("broker.log");
    let mut command = Command::new(BIN);
    command.arg("--config").arg(&config).args(["serve", "--dev"]).stdin(Stdio::null()).stdout(Stdio::null());
    command.stderr(std::fs::File::create(&log).unwrap());
    for (name, value) in &env {
        command.env(name, value);
    }
    let _broker = Broker { child: command.spawn().unwrap() };
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(response) = reqwest::get(format!("{base}/readyz")).await {
            if response.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "broker did not become ready: {}", std::fs::read_to_string(&log).unwrap_or_default());

    let minted = credbroker(&config, &env, &["dev", "token"]);
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let job_token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();

    let mut exchange_env = env.clone();
    exchange_env.push(("CREDBROKER_ID_TOKEN", job_token.clone()));
    let exchanged = credbroker(&config, &exchange_env, &["exchange", "--url", &base, "--role", "demo-kafka-producer", "--ttl", "10m"]);
    assert!(exchanged.status.success(), "{}", String::from_utf8_lossy(&exchanged.stderr));
    let exports = String::from_utf8(exchanged.stdout).unwrap();
    assert!(exports.contains("export KAFKA_SASL_MECHANISM='OAUTHBEARER'"), "{exports}");
    assert!(exports.contains("export KAFKA_PRINCIPAL='ci:demo/app'"), "{exports}");
    let kafka_token = exports
        .lines()
        .find_map(|line| line.strip_prefix("export KAFKA_OAUTHBEARER_TOKEN='"))
        .and_then(|rest| rest.strip_suffix('\''))
        .expect("token exported")
        .to_owned();

    // Replay through the CLI: the problem code on stderr, its documented exit status.
    let replayed = credbroker(&config, &exchange_env, &["exchange", "--url", &base, "--role", "demo-kafka-producer"]);
    assert_eq!(replayed.status.code(), Some(14));
    assert!(String::from_utf8_lossy(&replayed.stderr).contains("token_replayed"));

    // A policy denial: ref_protected must be the string "true".
    let unprotected = credbroker(&config, &env, &["dev", "token", "--claim", "ref_protected=false"]);
    let mut denied_env = env.clone();
    denied_env.push(("CREDBROKER_ID_TOKEN", String::from_utf8(unprotected.stdout).unwrap().trim().to_owned()));
    let denied = credbroker(&config, &denied_env, &["exchange", "--url", &base, "--role", "demo-kafka-producer", "--format", "json"]);
    assert_eq!(denied.status.code(), Some(13));

    let tail = credbroker(&config, &env, &["audit", "tail", "-n", "4", "--json"]);
    assert!(tail.status.success(), "{}", String::from_utf8_lossy(&tail.stderr));
    let rows: Vec<Value> = String::from_utf8(tail.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let decisions: Vec<&str> = rows.iter().map(|r| r["decision"].as_str().unwrap()).collect();
    // Newest first, and the newest is this very read, recorded before anything was shown.
    assert_eq!(decisions, ["audit_read", "denied", "denied", "issued"], "newest first");
    assert_eq!(rows[0]["subject"], "postgres", "the read names the database role: {}", rows[0]);
    assert!(rows[0]["detail"].as_str().unwrap().ends_with("audit tail -n 4"), "{}", rows[0]);
    for field in ["issuance_id", "code", "role", "target", "subject", "project_path", "job_id", "ttl_seconds", "expires_at", "credential_sha256"] {
        assert!(rows[3].get(field).is_some(), "audit tail lacks {field}");
    }
    assert_eq!(rows[3]["ttl_seconds"], 600);
    assert_eq!(rows[3]["credential_sha256"], credbroker::types::sha256_hex(kafka_token.as_bytes()));

    let log_text = std::fs::read_to_string(&log).unwrap();
    let issuance_id = rows[3]["issuance_id"].as_str().unwrap();
    let finished = log_text.lines().find(|line| line.contains(issuance_id) && line.contains("request finished"));
    assert!(finished.is_some_and(|line| line.contains("demo-kafka-producer")), "the request's last line names what it issued: {log_text}");
    assert!(!log_text.contains(&kafka_token), "minted credential in the broker log");
    assert!(!log_text.contains(&job_token), "job token in the broker log");
    let signature = job_token.rsplit('.').next().unwrap();
    assert!(!log_text.contains(signature), "part of a job token in the broker log");
}

#[test]
fn policy_explain_shows_each_condition() {
    let dir = common::temp_dir();
    let claims = dir.0.join("claims.json");
    std::fs::write(&claims, r#"{"job_project_path": "platform/orders", "ref_protected": "false", "ref_type": "branch", "ref": "main"}"#).unwrap();
    let output = Command::new(BIN)
        .args(["policy", "explain", "--policy-dir"])
        .arg(common::repo_path("policies"))
        .arg("--claims")
        .arg(&claims)
        .args(["--role", "orders-producer"])
        .env_remove("CREDBROKER_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("PASS claim job_project_path = \"platform/orders\""), "{text}");
    assert!(text.contains("FAIL claim ref_protected = \"true\": token has \"false\""), "{text}");
    assert!(text.contains("param principal = \"ci:platform/orders\""), "{text}");
    assert!(text.trim_end().ends_with("DENY"), "{text}");
}

#[test]
fn shipped_policies_pass_policy_check() {
    for args in [vec!["policy", "check", "policies"], vec!["--config", "dev/credbroker.toml", "policy", "check"]] {
        let output = Command::new(BIN).current_dir(env!("CARGO_MANIFEST_DIR")).args(&args).env_remove("CREDBROKER_CONFIG").output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn policy_check_names_file_role_and_key() {
    let dir = common::temp_dir();
    std::fs::write(
        dir.0.join("policies/bad.toml"),
        "[[role]]\nname = \"wide-open\"\nbackend = \"kafka\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\nprincipal = \"x\"\n[role.claims]\nref = \"main\"\n",
    )
    .unwrap();
    let output = Command::new(BIN).args(["policy", "check"]).arg(dir.0.join("policies")).env_remove("CREDBROKER_CONFIG").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml") && stderr.contains("role wide-open") && stderr.contains("key `claims`"), "{stderr}");
}

#[test]
fn a_worker_thread_count_it_cannot_use_is_refused_with_a_reason() {
    for bad in ["0", "two", " 2", "-1"] {
        let output = Command::new(BIN)
            .args(["policy", "check", "policies"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("CREDBROKER_CONFIG")
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{bad:?}: {stderr}");
        assert!(stderr.contains("TOKIO_WORKER_THREADS must be a number of threads, at least 1") && !stderr.contains("panicked"), "{bad:?}: {stderr}");
    }
    let output = Command::new(BIN)
        .args(["policy", "check", "policies"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CREDBROKER_CONFIG")
        .env("TOKIO_WORKER_THREADS", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
