//! The client-only build (`--no-default-features --features client`) that job images carry,
//! and the GitLab CI template that runs it: the build pulls in no server dependency, and the
//! binary `scripts/test.sh` builds that way (`CREDBROKER_CLIENT_BIN`) exchanges a job token
//! through `ci/credbroker.gitlab-ci.yml`'s `.credbroker` job, failing the job when refused.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TestApp;
use yaml_rust2::YamlLoader;

/// Crates the client must not contain (the "no sqlx, AWS SDK or vaultrs", and the rest
/// of the server's weight).
const SERVER_ONLY: &[&str] = &["sqlx", "aws-config", "aws-sdk-sts", "vaultrs", "axum", "jsonwebtoken", "openidconnect", "rskafka"];

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

#[test]
fn the_client_build_has_no_server_dependency() {
    let tree = |features: &[&str]| {
        let output = Command::new(cargo())
            .args(["tree", "--locked", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}"])
            .args(features)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().lines().filter_map(|line| line.split_whitespace().next().map(str::to_owned)).collect::<Vec<_>>()
    };
    let client = tree(&["--no-default-features", "--features", "client"]);
    for crate_name in SERVER_ONLY {
        assert!(!client.iter().any(|name| name == crate_name), "the client build depends on {crate_name}");
    }
    // The check sees the server's crates where they are, so it would catch them in the client.
    let full = tree(&[]);
    for crate_name in SERVER_ONLY {
        assert!(full.iter().any(|name| name == crate_name), "the full build should depend on {crate_name}");
    }
}

fn client_binary() -> PathBuf {
    let path = std::env::var("CREDBROKER_CLIENT_BIN")
        .expect("CREDBROKER_CLIENT_BIN: the client-only binary (scripts/test.sh builds it with --no-default-features --features client)");
    PathBuf::from(path)
}

/// The `.credbroker` job's `before_script`, as GitLab's shell runs it (`set -eo pipefail`),
/// followed by `script`, with the job's variables in the environment.
fn run_template_job(app: &TestApp, role: &str, token: &str, script: &str) -> std::process::Output {
    let text = std::fs::read_to_string(common::repo_path("ci/credbroker.gitlab-ci.yml")).unwrap();
    let documents = YamlLoader::load_from_str(&text).unwrap();
    let job = &documents[0][".credbroker"];
    assert_eq!(job["id_tokens"]["CREDBROKER_ID_TOKEN"]["aud"].as_str(), Some(common::AUDIENCE), "the template asks for the broker's audience");
    let before: Vec<&str> = job["before_script"].as_vec().unwrap().iter().map(|line| line.as_str().unwrap()).collect();
    let client = client_binary();
    let path = format!("{}:{}", client.parent().unwrap().display(), std::env::var("PATH").unwrap());
    let mut command = Command::new("bash");
    command.arg("-c").arg(format!("set -eo pipefail\n{}\n{script}", before.join("\n")));
    for (name, value) in job["variables"].as_hash().unwrap() {
        command.env(name.as_str().unwrap(), value.as_str().unwrap());
    }
    command
        .env("PATH", path)
        .env("CREDBROKER_URL", &app.url)
        .env("CREDBROKER_ROLE", role)
        .env("CREDBROKER_EXCHANGE_ARGS", "--ttl 10m")
        .env("CREDBROKER_ID_TOKEN", token)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_binary_exchanges_through_the_gitlab_template_and_a_refusal_fails_the_job() {
    let client = client_binary();
    let help = Command::new(&client).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("exchange") && help.contains("exec") && help.contains("revoke"), "{help}");
    assert!(!help.contains("serve") && !help.contains("migrate"), "the client build has no server subcommands: {help}");

    // The test issuer's tokens carry `aud` = common::AUDIENCE, the template's default.
    let app = TestApp::spawn().await;
    let token = app.issuer.token();
    let job = run_template_job(&app, "orders-producer", &token, "echo \"token=$KAFKA_OAUTHBEARER_TOKEN\"; echo \"expires=$CREDBROKER_EXPIRES_AT\"");
    let stdout = String::from_utf8_lossy(&job.stdout);
    assert!(job.status.success(), "{stdout}{}", String::from_utf8_lossy(&job.stderr));
    let minted = stdout.lines().find_map(|line| line.strip_prefix("token=")).unwrap();
    assert_eq!(minted.split('.').count(), 3, "a JWT for Kafka: {stdout}");
    // The row says what the job got, with the TTL asked for through CREDBROKER_EXCHANGE_ARGS.
    let granted: i32 =
        sqlx::query_scalar("select granted_ttl_seconds from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(granted, 600);

    // Refused: the job stops in before_script, and its script never runs without a credential.
    let refused = run_template_job(&app, "no-such-role", &app.issuer.token(), "echo script-ran");
    assert_eq!(refused.status.code(), Some(13), "access_denied's exit status: {}", String::from_utf8_lossy(&refused.stderr));
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("script-ran"));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("access_denied"));
}
