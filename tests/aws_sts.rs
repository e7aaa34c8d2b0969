//! The aws_sts backend against a real STS implementation: moto in server mode on loopback,
//! called by the real aws-sdk-sts client through `endpoint_url`. A recording proxy keeps
//! every request as sent, and each is held to STS's own limits (moto would accept more).

mod common;

use std::process::{Command, Stdio};

use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
use common::moto::{assert_sts_would_accept, free_port, spawn_with_aws, Moto, RecordingProxy, BROKER_ACCESS_KEY_ID, BROKER_SECRET_ACCESS_KEY};
use common::TestApp;
use serde_json::{json, Value};
use time::OffsetDateTime;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

const POLICIES: &str = r#"
[[role]]
name = "aws-deploy"
backend = "aws"
issuer = "gitlab"
default_ttl = "30m"
max_ttl = "2h"
role_arn = "arn:aws:iam::123456789012:role/ci-deploy"
session_policy = '''
{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::artifacts/{job_project_path}/{ref}/*" }
  ]
}
'''
[role.session_tags]
project = "{job_project_path}"
ref = "{ref}"
pipeline = "{pipeline_id}"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "aws-overshoot"
backend = "aws"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
on_short_deadline = "allow_overshoot"
role_arn = "arn:aws:iam::123456789012:role/ci-read"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "aws-named"
backend = "aws"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
allow_claims_in = ["role_arn"]
role_arn = "arn:aws:iam::123456789012:role/ci/project-{job_project_id}"
role_session_name = "deploy-{ref}"
source_identity = "{user_login}"
[role.session_tags]
ref = "{ref}"
who = "{user_login}"
[role.claims]
job_project_path = "platform/orders"
"#;

async fn start() -> (Moto, RecordingProxy, TestApp) {
    let moto = Moto::start().await;
    let proxy = RecordingProxy::start(&moto.url).await;
    let app = spawn_with_aws(&proxy.url, "", POLICIES).await;
    (moto, proxy, app)
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
}

/// Calls moto with the minted credentials: proof they are real session credentials of the
/// assumed role, not just strings the broker made up.
async fn caller_arn(moto: &Moto, credential: &Value) -> String {
    let credentials = Credentials::new(
        credential["access_key_id"].as_str().unwrap(),
        credential["secret_access_key"].as_str().unwrap(),
        credential["session_token"].as_str().map(str::to_owned),
        None,
        "minted-by-credbroker",
    );
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .endpoint_url(&moto.url)
        .credentials_provider(credentials)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    let identity = aws_sdk_sts::Client::from_conf(config).get_caller_identity().send().await.unwrap();
    identity.arn().unwrap().to_owned()
}

#[tokio::test]
async fn job_token_becomes_an_sts_session_with_the_granted_duration_and_the_jobs_identity() {
    let (moto, proxy, app) = start().await;
    let token = app.issuer.token();
    let (status, headers, body) = app.exchange(&token, json!({"role": "aws-deploy", "ttl_seconds": 1200})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["target"], "aws");
    assert_eq!(body["ttl_seconds"], 1200);

    let requests = proxy.assume_role_requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_sts_would_accept(sent);
    assert_eq!(sent.param("DurationSeconds"), Some("1200"), "DurationSeconds = the granted TTL");
    assert_eq!(sent.param("RoleArn"), Some("arn:aws:iam::123456789012:role/ci-deploy"));
    assert_eq!(sent.param("RoleSessionName"), Some("ci-123456"), "default ci-<job_id>");
    assert_eq!(sent.param("SourceIdentity"), Some("alice"), "default user_login");
    let mut tags = sent.tags();
    tags.sort();
    assert_eq!(tags, [("pipeline".into(), "9001".into()), ("project".into(), "platform/orders".into()), ("ref".into(), "main".into())]);
    assert_eq!(
        sent.param("Policy"),
        Some(
            r#"{"Statement":[{"Action":"s3:GetObject","Effect":"Allow","Resource":"arn:aws:s3:::artifacts/platform/orders/main/*"}],"Version":"2012-10-17"}"#
        )
    );
    let authorization = sent.headers.iter().find(|(name, _)| name == "authorization").map(|(_, v)| v.as_str()).unwrap();
    assert!(authorization.contains(BROKER_ACCESS_KEY_ID), "signed with the broker's identity from the SDK chain");

    let credential = &body["credential"];
    let access_key_id = credential["access_key_id"].as_str().unwrap();
    let secret = credential["secret_access_key"].as_str().unwrap();
    let session_token = credential["session_token"].as_str().unwrap();
    let assumed_role_arn = credential["assumed_role_arn"].as_str().unwrap();
    assert_eq!(assumed_role_arn, "arn:aws:sts::123456789012:assumed-role/ci-deploy/ci-123456");
    let expiration = rfc3339(credential["expiration"].as_str().unwrap());
    let expires_at = rfc3339(body["expires_at"].as_str().unwrap());
    assert!((expiration - expires_at).whole_seconds().abs() <= 5, "STS's expiration {expiration} vs granted {expires_at}");
    assert_eq!(body["env"]["AWS_ACCESS_KEY_ID"], access_key_id);
    assert_eq!(body["env"]["AWS_SECRET_ACCESS_KEY"], secret);
    assert_eq!(body["env"]["AWS_SESSION_TOKEN"], session_token);
    assert_eq!(caller_arn(&moto, credential).await, assumed_role_arn, "moto knows the session as the assumed role");

    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["backend"], "aws");
    assert_eq!(row["granted_ttl_seconds"], 1200);
    assert_eq!(row["credential_handle"], format!("{access_key_id} {assumed_role_arn}"));
    assert_eq!(row["overshoot_seconds"], Value::Null);
    let stored = row.to_string();
    for secret in [secret, session_token, BROKER_SECRET_ACCESS_KEY] {
        assert!(!stored.contains(secret), "secret in the audit row");
    }
}

#[tokio::test]
async fn sts_floor_is_refused_or_overshot_as_the_role_says() {
    let (_moto, proxy, app) = start().await;
    let deadline = now() + 300;

    // refuse (the default): nothing reaches STS, and the refusal names both numbers.
    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": deadline})), json!({"role": "aws-deploy"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "ttl_not_satisfiable");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("at least 900 s"), "{detail}");
    let remaining: i64 = detail.split(" s away").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!((295..=300).contains(&remaining), "{detail}");
    assert!(proxy.assume_role_requests().is_empty(), "a refused exchange never calls STS");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["code"].as_str()), (Some("denied"), Some("ttl_not_satisfiable")));

    // allow_overshoot: 900 s, and the row says by how much it outlives the job.
    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": deadline})), json!({"role": "aws-overshoot"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ttl_seconds"], 900);
    let requests = proxy.assume_role_requests();
    assert_eq!(requests.len(), 1);
    assert_sts_would_accept(&requests[0]);
    assert_eq!(requests[0].param("DurationSeconds"), Some("900"));
    assert!(rfc3339(body["expires_at"].as_str().unwrap()) > rfc3339(body["job_deadline"].as_str().unwrap()));
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    let overshoot = row["overshoot_seconds"].as_i64().unwrap();
    assert!((600..=605).contains(&overshoot), "{row}");
    assert!(row["detail"].as_str().unwrap().contains("past the job deadline"), "{row}");
}

#[tokio::test]
async fn requests_below_the_floor_are_raised_to_it_never_sent_short() {
    let (_moto, proxy, app) = start().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "aws-deploy", "ttl_seconds": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ttl_seconds"], 900);
    let requests = proxy.assume_role_requests();
    assert_sts_would_accept(&requests[0]);
    assert_eq!(requests[0].param("DurationSeconds"), Some("900"));

    // A minimum the job cannot meet is still refused before any call.
    let token = app.issuer.token_with(json!({"exp": now() + 600}));
    let (status, _, body) = app.exchange(&token, json!({"role": "aws-overshoot", "min_ttl_seconds": 900})).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("ttl_not_satisfiable")), "{body}");
    assert_eq!(proxy.assume_role_requests().len(), 1);
}

#[tokio::test]
async fn unreachable_sts_is_backend_failed_with_a_failed_row_and_no_credential() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let app = spawn_with_aws(&closed, "", POLICIES).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "aws-deploy"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    assert!(body.get("credential").is_none());
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("Unreachable"), "{detail}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["code"].as_str()), (Some("failed"), Some("backend_failed")));
    assert!(row["detail"].as_str().unwrap().contains("Unreachable"), "{row}");
    assert_eq!(row["credential_sha256"], Value::Null);
    assert!(!row.to_string().contains(BROKER_SECRET_ACCESS_KEY));
}

#[tokio::test]
async fn sts_error_code_reaches_the_client_and_the_audit_row_but_not_the_brokers_keys() {
    // moto checking every request's access key the way STS does: the broker's fake key is
    // unknown to it, so STS answers InvalidClientTokenId.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]).await;
    let app = spawn_with_aws(&moto.url, "", POLICIES).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "aws-deploy"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("STS AssumeRole failed: InvalidClientTokenId"), "{detail}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "failed");
    assert!(row["detail"].as_str().unwrap().contains("InvalidClientTokenId"), "{row}");
    for text in [detail.to_owned(), row.to_string()] {
        assert!(!text.contains(BROKER_SECRET_ACCESS_KEY), "{text}");
    }
}

#[tokio::test]
async fn hostile_claims_are_sanitised_to_stss_rules_or_refused() {
    let (moto, proxy, app) = start().await;
    let long_ref = format!("feature/{}", "x".repeat(300));
    let token = app.issuer.token_with(json!({
        "ref": long_ref, "user_login": "Ålice Smith 🚀", "job_id": "12 34", "job_project_id": "42",
    }));
    let (status, _, body) = app.exchange(&token, json!({"role": "aws-named"})).await;
    assert_eq!(status, 200, "{body}");
    let sent = &proxy.assume_role_requests()[0];
    assert_sts_would_accept(sent);
    assert_eq!(sent.param("RoleArn"), Some("arn:aws:iam::123456789012:role/ci/project-42"));
    let session_name = sent.param("RoleSessionName").unwrap();
    assert_eq!(session_name.len(), 64);
    assert!(session_name.starts_with("deploy-feature_xxx"), "{session_name}");
    let identity = sent.param("SourceIdentity").unwrap();
    assert!(identity.starts_with("_lice_Smith__-"), "{identity}");
    let tags: std::collections::BTreeMap<String, String> = sent.tags().into_iter().collect();
    assert_eq!(tags["ref"].chars().count(), 256, "cut to STS's 256 with a hash suffix");
    assert!(tags["ref"].starts_with("feature/xxx"));
    assert!(tags["who"].starts_with("Ålice Smith _-"), "letters and spaces of any script are valid tag values: {}", tags["who"]);
    assert_eq!(body["credential"]["role_session_name"], session_name);
    assert!(caller_arn(&moto, &body["credential"]).await.ends_with(&format!("/{session_name}")));

    // Claims that would change what a policy or ARN says are refused, not sanitised.
    let refusals = [
        ("aws-deploy", json!({"ref": "main\",\"Resource\":\"*"}), "session_policy"),
        ("aws-deploy", json!({"ref": "*"}), "session_policy"),
        ("aws-deploy", json!({"ref": "r".repeat(129)}), "longer than 128"),
        ("aws-named", json!({"job_project_id": "42/../admin"}), "role_arn"),
        ("aws-named", json!({"user_login": "x"}), "source_identity"),
    ];
    for (role, claims, expected) in refusals {
        let (status, _, body) = app.exchange(&app.issuer.token_with(claims.clone()), json!({"role": role})).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("access_denied")), "{claims}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(expected), "{claims}: {body}");
        let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
        assert_eq!(row["decision"], "denied");
    }
    assert_eq!(proxy.assume_role_requests().len(), 1, "no refused exchange reached STS");
}

/// Policies STS would refuse fail `credbroker policy check`, naming the file, role and key.
#[test]
fn policies_sts_would_refuse_never_load() {
    let role = |extra: &str| {
        format!(
            "[[role]]\nname = \"bad\"\nbackend = \"aws\"\nissuer = \"gitlab\"\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n{extra}\n[role.claims]\nproject_path = \"a/b\"\n"
        )
    };
    let arn = "role_arn = \"arn:aws:iam::123456789012:role/ci\"";
    let many_tags: String = (0..51).map(|n| format!("t{n} = \"{{job_id}}\"\n")).collect();
    let statements: String = (0..12)
        .map(|n| format!(r#"{{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::b/{{project_path}}/{n}"}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let cases = [
        (role("role_arn = \"arn:aws:iam::123:role/ci\""), "key `role_arn`"),
        (role("role_arn = \"arn:aws:iam::123456789012:role/ci-{project_id}\""), "allow_claims_in"),
        (role(&format!("{arn}\nsession_policy = '{{not json'")), "not valid JSON"),
        (role(&format!("{arn}\nsession_policy = '{{\"Version\":\"2012-10-17\",\"Statement\":[{statements}]}}'")), "2048"),
        (role(&format!("{arn}\nsession_policy = '{{\"Version\":\"2012-10-17\"}}'")), "Statement"),
        (role(&format!("{arn}\n[role.session_tags]\n{many_tags}")), "at most 50"),
        (role(&format!("{arn}\n[role.session_tags]\n{} = \"x\"", "k".repeat(129))), "1 to 128"),
        (role(&format!("{arn}\n[role.session_tags]\n\"aws:x\" = \"x\"")), "reserved"),
        (role(&format!("{arn}\nrole_session_name = \"ci job\"")), "key `role_session_name`"),
        (role(&format!("{arn}\non_short_deadline = \"sometimes\"")), "allow_overshoot"),
    ];
    for (text, expected) in cases {
        let dir = common::temp_dir();
        std::fs::write(dir.0.join("policies/aws.toml"), &text).unwrap();
        let output = Command::new(BIN).args(["policy", "check"]).arg(dir.0.join("policies")).env_remove("CREDBROKER_CONFIG").output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted:\n{text}");
        assert!(stderr.contains("aws.toml") && stderr.contains("role bad") && stderr.contains(expected), "{expected}: {stderr}");
    }
}

/// The job's side: `credbroker exchange` against the broker, as a CI script runs it.
// Multi-threaded: the client runs as a blocking child process while this process serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_client_prints_aws_env_and_credential_process_json() {
    let (moto, proxy, app) = start().await;
    let exchange = |token: String, format: &str| {
        let mut command = Command::new(BIN);
        command
            .args(["exchange", "--url", &app.url, "--role", "aws-deploy", "--ttl", "20m", "--format", format])
            .env("CREDBROKER_ID_TOKEN", token)
            .env_remove("CREDBROKER_CONFIG")
            .stdin(Stdio::null());
        command.output().unwrap()
    };

    let output = exchange(app.issuer.token(), "env");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let exports = String::from_utf8(output.stdout).unwrap();
    let export = |name: &str| {
        exports
            .lines()
            .find_map(|line| line.strip_prefix(&format!("export {name}='")))
            .and_then(|rest| rest.strip_suffix('\''))
            .unwrap_or_else(|| panic!("{name} not exported: {exports}"))
            .to_owned()
    };
    let from_env = json!({
        "access_key_id": export("AWS_ACCESS_KEY_ID"),
        "secret_access_key": export("AWS_SECRET_ACCESS_KEY"),
        "session_token": export("AWS_SESSION_TOKEN"),
    });
    assert!(caller_arn(&moto, &from_env).await.ends_with("assumed-role/ci-deploy/ci-123456"));
    assert_eq!(proxy.assume_role_requests()[0].param("DurationSeconds"), Some("1200"), "--ttl 20m");

    let output = exchange(app.issuer.token(), "aws-credential-process");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let document: Value = serde_json::from_slice(&output.stdout).unwrap();
    let keys: Vec<&String> = document.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["AccessKeyId", "Expiration", "SecretAccessKey", "SessionToken", "Version"]);
    assert_eq!(document["Version"], 1);
    assert!(rfc3339(document["Expiration"].as_str().unwrap()) > OffsetDateTime::now_utc() + time::Duration::minutes(19));
    let minted = json!({
        "access_key_id": document["AccessKeyId"], "secret_access_key": document["SecretAccessKey"],
        "session_token": document["SessionToken"],
    });
    assert!(caller_arn(&moto, &minted).await.contains("assumed-role/ci-deploy/"));
    for request in proxy.assume_role_requests() {
        assert_sts_would_accept(&request);
    }

    // Refusals keep their documented exit status through the client.
    let short = exchange(app.issuer.token_with(json!({"exp": now() + 120})), "env");
    assert_eq!(short.status.code(), Some(15), "{}", String::from_utf8_lossy(&short.stderr));
    assert!(String::from_utf8_lossy(&short.stderr).contains("ttl_not_satisfiable"));
}
