//! `credbroker exchange --out-dir` and `exec --out-dir`: the real binary against the real broker,
//! and every file read by its standard client library: librdkafka (confluent-kafka) against
//! tansu, boto3 against moto, looker-sdk against the Looker stand-in. The binary and the client
//! libraries are waited for in blocking calls, so each test runs the in-process broker on a
//! multi-threaded runtime that keeps serving meanwhile.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::moto::{spawn_with_aws, Moto};
use common::{temp_dir, TestApp, POLICIES};
use credbroker::types::sha256_hex;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

fn exchange(app: &TestApp, token: &str, role: &str, out_dir: &Path, format: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["exchange", "--url", &app.url, "--role", role, "--format", format, "--out-dir"])
        .arg(out_dir)
        .env("CREDBROKER_ID_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_success(output: &std::process::Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn python(script: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new("python3");
    command.arg("-c").arg(script).args(args).stdin(Stdio::null());
    for (name, value) in env {
        match value {
            // Unset, so the library falls back to the files.
            &"" => command.env_remove(name),
            value => command.env(name, value),
        };
    }
    command.output().unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_files_are_private_name_the_token_file_and_are_replaced_on_a_rerun() {
    let app = TestApp::spawn().await;
    let dir = temp_dir();
    let out = dir.0.join("credentials");
    let token = app.issuer.token();
    let reply = assert_success(&exchange(&app, &token, "orders-multi", &out, "json"));
    assert_eq!(mode(&out), 0o700, "created private");
    let token_file = out.join("orders-multi.kafka-token");
    for name in
        ["orders-multi.kafka-token", "orders-multi.kafka-java.properties", "orders-multi.librdkafka.properties", "orders-multi.kafka-assertion"]
    {
        assert_eq!(mode(&out.join(name)), 0o600, "{name}");
    }
    assert_eq!(read(&token_file), reply["credential"]["token"].as_str().unwrap());
    let java = read(&out.join("orders-multi.kafka-java.properties"));
    assert!(java.contains(&format!("sasl.oauthbearer.token.endpoint.url=file:{}\n", token_file.display())), "{java}");
    assert!(token_file.is_absolute());
    // Java's own properties parser reads the file and finds the token through its file: URI.
    let java_reads = Command::new("java")
        .arg(common::repo_path("tests/KafkaJavaProperties.java"))
        .arg(out.join("orders-multi.kafka-java.properties"))
        .output()
        .expect("java (the JDK scripts/test.sh installs)");
    assert!(java_reads.status.success(), "{}", String::from_utf8_lossy(&java_reads.stderr));
    assert_eq!(String::from_utf8_lossy(&java_reads.stdout), reply["credential"]["token"].as_str().unwrap());

    let again = assert_success(&exchange(&app, &token, "orders-multi", &out, "json"));
    assert_ne!(again["issuance_id"], reply["issuance_id"]);
    assert_eq!(read(&token_file), again["credential"]["token"].as_str().unwrap(), "replaced in place");
    let leftovers: Vec<_> =
        std::fs::read_dir(&out).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "no partial files left: {leftovers:?}");
}

/// The librdkafka properties are complete for librdkafka: confluent-kafka loads them as they
/// are (only the transport is switched to plaintext for tansu) and fetches its own token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_properties_are_read_by_confluent_kafka_which_then_fetches_its_own_token() {
    let app = TestApp::spawn().await;
    let dir = temp_dir();
    let tansu = common::tansu::Tansu::start(&dir.0).await;
    let out = dir.0.join("credentials");
    assert_success(&exchange(&app, &app.issuer.token(), "orders-multi", &out, "json"));
    let script = r##"
import sys, time
from confluent_kafka import Producer
config = dict(line.split("=", 1) for line in open(sys.argv[1]).read().splitlines() if line and not line.startswith("#"))
config["bootstrap.servers"] = sys.argv[2]
config["security.protocol"] = "SASL_PLAINTEXT"
producer = Producer(config)
deadline = time.monotonic() + 8
while time.monotonic() < deadline:
    producer.poll(0.2)
"##;
    let properties = out.join("orders-multi.librdkafka.properties");
    let mut client = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&properties)
        .arg(tansu.bootstrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let fetched = loop {
        let rows: Vec<Value> =
            sqlx::query_scalar("select to_jsonb(a) from audit_events a where endpoint = 'oauth_token'").fetch_all(&app.pool).await.unwrap();
        if !rows.is_empty() || started.elapsed() > std::time::Duration::from_secs(15) {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    client.kill().unwrap();
    client.wait().unwrap();
    assert_eq!(fetched.len(), 1, "librdkafka fetched one token through the token endpoint");
    assert_eq!((fetched[0]["decision"].as_str(), fetched[0]["role"].as_str()), (Some("issued"), Some("orders-multi")), "{}", fetched[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_profile_is_read_by_boto3_and_env_output_has_region_and_expiration() {
    let moto = Moto::start().await;
    let policies = "[[role]]\nname = \"deploy\"\nbackend = \"aws\"\nissuer = \"gitlab\"\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n\
                    role_arn = \"arn:aws:iam::123456789012:role/ci-deploy\"\n[role.claims]\njob_project_path = \"platform/orders\"\n";
    let app = spawn_with_aws(&moto.url, "", policies).await;
    let dir = temp_dir();
    let out = dir.0.join("aws");
    let output = exchange(&app, &app.issuer.token(), "deploy", &out, "dotenv");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let env = String::from_utf8(output.stdout).unwrap();
    assert!(env.contains("AWS_REGION=eu-west-1\n"), "{env}");
    let credentials = out.join("deploy.aws-credentials");
    let expiration = env.lines().find_map(|line| line.strip_prefix("AWS_CREDENTIAL_EXPIRATION=")).expect("AWS_CREDENTIAL_EXPIRATION");
    assert!(time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339).is_ok(), "{expiration}");
    assert_eq!(mode(&credentials), 0o600);

    let script = r#"
import json, sys, boto3
session = boto3.Session(profile_name="deploy")
identity = session.client("sts", endpoint_url=sys.argv[1]).get_caller_identity()
credentials = session.get_credentials()
print(json.dumps({"arn": identity["Arn"], "region": session.region_name, "access_key": credentials.access_key}))
"#;
    let (credentials_file, config_file) = (credentials.display().to_string(), out.join("deploy.aws-config").display().to_string());
    let environment = [
        ("AWS_SHARED_CREDENTIALS_FILE", credentials_file.as_str()),
        ("AWS_CONFIG_FILE", config_file.as_str()),
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_REGION", ""),
    ];
    let output = python(script, &[&moto.url], &environment);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    let access_key = env.lines().find_map(|line| line.strip_prefix("AWS_ACCESS_KEY_ID=")).unwrap();
    assert_eq!(seen["access_key"], access_key, "boto3 used the profile's keys");
    assert_eq!(seen["region"], "eu-west-1");
    assert!(seen["arn"].as_str().unwrap().contains("assumed-role/ci-deploy/"), "{seen}");
}

/// README's looker-sdk snippet, run as it is printed there, making one API call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looker_files_work_with_the_readme_looker_sdk_snippet() {
    let looker = common::looker_standin::LookerStandin::start().await;
    looker.add_user("42", "reports-bot@example.com");
    let secrets = temp_dir();
    std::fs::write(secrets.0.join("id"), common::looker_standin::CLIENT_ID).unwrap();
    std::fs::write(secrets.0.join("secret"), common::looker_standin::CLIENT_SECRET).unwrap();
    std::fs::write(secrets.0.join("revocation.key"), "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n").unwrap();
    let tables = format!(
        "[backends.looker]\ntype = \"looker\"\nbase_url = \"{}\"\nadmin_client_id = {{ file = \"{}\" }}\nadmin_client_secret = {{ file = \"{}\" }}\n",
        looker.url,
        secrets.0.join("id").display(),
        secrets.0.join("secret").display()
    );
    let extra = format!("revocation_secret_key = {{ file = \"{}\" }}", secrets.0.join("revocation.key").display());
    let policies = format!(
        "{POLICIES}\n[[role]]\nname = \"reports\"\nbackend = \"looker\"\nissuer = \"gitlab\"\ndefault_ttl = \"30m\"\nmax_ttl = \"1h\"\nuser_id = \"42\"\n\
         [role.claims]\njob_project_path = \"platform/orders\"\n"
    );
    let app = TestApp::spawn_full(&extra, &tables, &policies, None).await;
    let out = secrets.0.join("credentials");
    let reply = assert_success(&exchange(&app, &app.issuer.token(), "reports", &out, "json"));
    let token = reply["credential"]["access_token"].as_str().unwrap();
    assert_eq!(read(&out.join("reports.looker-token")), token);

    let readme = read(&common::repo_path("README.md"));
    let snippet =
        readme.split("```python\n# looker-sdk\n").nth(1).and_then(|rest| rest.split("\n```").next()).expect("README has the looker-sdk snippet");
    assert!(snippet.contains("looker_sdk"), "{snippet}");
    let output = Command::new("python3").arg("-c").arg(snippet).current_dir(&secrets.0).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed.trim(), "42", "the call ran as the role's Looker user");
    assert_eq!(sha256_hex(token.as_bytes()), app.audit_row(reply["issuance_id"].as_str().unwrap()).await["credential_sha256"]);
}

/// `exec --out-dir` keeps the files current: a renewal replaces the token file in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_replaces_the_files_at_each_renewal() {
    let app = TestApp::spawn().await;
    let dir = temp_dir();
    let out = dir.0.join("exec-out");
    let token_file = out.join("orders-multi.kafka-token");
    let script = format!("cat {0}; echo; sleep 4; cat {0}", token_file.display());
    let output = Command::new(BIN)
        .args(["exec", "--url", &app.url, "--role", "orders-multi", "--ttl", "3s", "--out-dir"])
        .arg(&out)
        .args(["--", "sh", "-c", &script])
        .env("CREDBROKER_ID_TOKEN", app.issuer.token())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    let tokens: Vec<&str> = printed.lines().collect();
    assert_eq!(tokens.len(), 2, "{printed}");
    assert_ne!(tokens[0], tokens[1], "renewed in place");
    let issued: Vec<String> = sqlx::query_scalar("select credential_sha256 from audit_events where decision = 'issued' order by occurred_at")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(issued[0], sha256_hex(tokens[0].as_bytes()));
    assert!(issued[1..].contains(&sha256_hex(tokens[1].as_bytes())), "the file held a renewal's token");
}
