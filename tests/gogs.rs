//! Gogs webhooks end to end: deliveries signed the way Gogs signs them (HMAC-SHA256 computed
//! here by Python's hmac module, independent of the broker's code) over payloads shaped like
//! real Gogs 0.13 deliveries (REFERENCE.md), through verification, recording, delivery tokens
//! and exchanges; plus the event outbox against real Postgres. No Gogs runs here (PEERS.md).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::post;
use axum::{Json, Router};
use common::{rsa_pem, temp_dir, TempDir, TestApp, AUDIT_ROW};
use credbroker::audit::outbox::OutboxEvent;
use credbroker::events::{EventSink, Pass, Publisher, PublisherSettings};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{json, Value};

const SECRET: &str = "gogs-hook-secret-0123";
const MAIN_SHA: &str = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";

const AUDITOR_PROJECT: &str = "security/audit";

const POLICIES: &str = r#"
[auditors]
issuer = "gitlab"
[auditors.claims]
project_path = "security/audit"

[[role]]
name = "warehouse-deploy"
backend = "kafka"
issuer = "gogs"
default_ttl = "5m"
max_ttl = "10m"
principal = "gogs:{repository}@{sha}"
[role.claims]
repository = "data/warehouse"
ref = "refs/heads/main"
event = "push"
pusher = ["alice", "bob"]

[[role]]
name = "warehouse-loader"
backend = "kafka"
issuer = "gitlab"
default_ttl = "5m"
max_ttl = "10m"
principal = "loader:{delivery_repository}@{delivery_sha}"
[role.claims]
sub = "system:serviceaccount:data:loader"
[role.delivery]
repository = "data/warehouse"
ref = "refs/heads/main"
"#;

/// What the automation received: the X-Credbroker-Delivery header and the JSON body.
type Received = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// The automation the broker forwards deliveries to: keeps what it received.
struct Automation {
    url: String,
    received: Received,
}

async fn automation() -> Automation {
    let received: Received = Arc::default();
    let sink = received.clone();
    let router = Router::new().route(
        "/run",
        post(move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
            let sink = sink.clone();
            async move {
                let token = headers.get("x-credbroker-delivery").map(|v| v.to_str().unwrap().to_owned());
                sink.lock().unwrap().push((token, body));
                "queued"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/run", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Automation { url, received }
}

struct Gogs {
    app: TestApp,
    automation: Automation,
    _keys: TempDir,
}

async fn spawn() -> Gogs {
    let keys = temp_dir();
    let key_file = keys.0.join("gogs.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    spawn_signing_with(keys, &format!("signing_key_file = \"{}\"", key_file.display()), "").await
}

/// `signing`: the `[gogs]` line that chooses the signing key; `tables`: more config tables
/// (e.g. `[vault]`). `keys` holds the files the configuration names.
async fn spawn_signing_with(keys: TempDir, signing: &str, tables: &str) -> Gogs {
    spawn_configured(keys, "", signing, tables).await
}

/// As [`spawn_signing_with`], with top-level configuration lines (`extra`).
async fn spawn_configured(keys: TempDir, extra: &str, signing: &str, tables: &str) -> Gogs {
    let automation = automation().await;
    let secret_file = keys.0.join("hook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let tables = format!(
        r#"
{tables}

[gogs]
{signing}
token_lifetime = "15m"
max_payload_bytes = 65536

[gogs.hooks.warehouse]
secret = {{ file = "{secret}" }}
repositories = ["data/warehouse"]
forward_url = "{forward}"

[gogs.hooks.relay]
secret = {{ file = "{secret}" }}
repositories = ["data/*"]
respond_with_token = true
"#,
        secret = secret_file.display(),
        forward = automation.url,
    );
    let app = TestApp::spawn_full(extra, &tables, POLICIES, None).await;
    Gogs { app, automation, _keys: keys }
}

/// A push as Gogs 0.13 sends it (fields per REFERENCE.md), indented the way Gogs marshals it.
/// Each call is a different push (its commit message differs), as real pushes' bodies are: the
/// broker accepts a body once per hook.
fn push_payload(git_ref: &str, after: &str, pusher: &str) -> String {
    let payload = json!({
        "ref": git_ref,
        "before": "1111111111111111111111111111111111111111",
        "after": after,
        "compare_url": "https://gogs.example.com/data/warehouse/compare/1111111...f00dfee",
        "commits": [{
            "id": after,
            "message": format!("Load orders nightly (run {})\n", new_id()),
            "url": format!("https://gogs.example.com/data/warehouse/commit/{after}"),
            "author": { "name": "Alice", "email": "alice@example.com", "username": pusher },
            "committer": { "name": "Alice", "email": "alice@example.com", "username": pusher },
            "added": ["loader.sql"], "removed": [], "modified": [],
            "timestamp": "2026-11-22T06:00:00Z"
        }],
        "repository": {
            "id": 17, "name": "warehouse", "full_name": "data/warehouse",
            "owner": { "id": 3, "username": "data", "login": "data", "full_name": "", "email": "", "avatar_url": "" },
            "description": "", "private": true, "fork": false, "default_branch": "main",
            "html_url": "https://gogs.example.com/data/warehouse",
            "clone_url": "https://gogs.example.com/data/warehouse.git"
        },
        "pusher": { "id": 5, "name": pusher, "email": format!("{pusher}@example.com"), "username": pusher, "login": pusher },
        "sender": { "id": 5, "login": pusher, "username": pusher, "full_name": "", "email": format!("{pusher}@example.com") }
    });
    serde_json::to_string_pretty(&payload).unwrap()
}

/// Independent HMAC-SHA256 (Python's hmac), lowercase hex, as Gogs puts it in X-Gogs-Signature.
fn gogs_signature(secret: &str, payload: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", "import hmac,hashlib,sys; print(hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), hashlib.sha256).hexdigest())", secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

struct Sent {
    status: u16,
    body: Value,
}

impl Gogs {
    async fn deliver(&self, hook: &str, event: &str, delivery_id: &str, content_type: &str, body: Vec<u8>, signature: Option<String>) -> Sent {
        let mut request = self
            .app
            .client
            .post(format!("{}/v1/hooks/gogs/{hook}", self.app.url))
            .header("content-type", content_type)
            .header("x-gogs-event", event)
            .header("x-gogs-delivery", delivery_id)
            .header("x-github-event", event)
            .body(body);
        if let Some(signature) = signature {
            request = request.header("x-gogs-signature", signature);
        }
        let response = request.send().await.unwrap();
        Sent { status: response.status().as_u16(), body: response.json().await.unwrap_or(Value::Null) }
    }

    /// A JSON delivery signed with the hook's secret.
    async fn push(&self, hook: &str, delivery_id: &str, payload: &str) -> Sent {
        let signature = gogs_signature(SECRET, payload.as_bytes());
        self.deliver(hook, "push", delivery_id, "application/json", payload.as_bytes().to_vec(), Some(signature)).await
    }

    async fn delivery_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from gogs_deliveries").fetch_one(&self.app.pool).await.unwrap()
    }

    async fn delivery_row(&self, delivery_id: &str) -> Value {
        sqlx::query_scalar("select to_jsonb(d) from gogs_deliveries d where delivery_id = $1")
            .bind(delivery_id)
            .fetch_one(&self.app.pool)
            .await
            .unwrap()
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn signed_push_is_recorded_forwarded_and_exchanged_for_a_credential_bound_to_its_commit() {
    let gogs = spawn().await;
    let id = new_id();
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let sent = gogs.push("warehouse", &id, &payload).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.body["status"], "accepted");
    assert_eq!(sent.body["forward_status"], "200");
    assert!(sent.body.get("delivery_token").is_none(), "this hook forwards; Gogs' delivery history must not see the token");

    let row = gogs.delivery_row(&id).await;
    assert_eq!(row["hook"], "warehouse");
    assert_eq!(row["event"], "push");
    assert_eq!(row["outcome"], "accepted");
    assert_eq!(row["repository"], "data/warehouse");
    assert_eq!(row["ref"], "refs/heads/main");
    assert_eq!(row["ref_type"], "branch");
    assert_eq!(row["before_sha"], "1111111111111111111111111111111111111111");
    assert_eq!(row["after_sha"], MAIN_SHA);
    assert_eq!(row["pusher"], "alice");
    assert_eq!(row["forward_status"], "200");
    assert_eq!(row["payload_sha256"], credbroker::types::sha256_hex(payload.as_bytes()));

    let (header_token, forwarded) = gogs.automation.received.lock().unwrap()[0].clone();
    let token = forwarded["delivery_token"].as_str().unwrap().to_owned();
    assert_eq!(header_token.as_deref(), Some(token.as_str()));
    assert_eq!(forwarded["after"], MAIN_SHA);
    assert_eq!(forwarded["payload"]["repository"]["full_name"], "data/warehouse");
    assert_eq!(row["token_sha256"], credbroker::types::sha256_hex(token.as_bytes()));
    assert!(!row.to_string().contains(&token), "no token in the delivery row");

    // The token verifies against the broker's published JWKS under issuer <public_url>/gogs.
    let jwks: JwkSet = reqwest::get(format!("{}/.well-known/jwks.json", gogs.app.url)).await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("delivery token key published");
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[common::AUDIENCE]);
    validation.set_issuer(&[format!("{}/gogs", gogs.app.public_url)]);
    let claims = jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).unwrap().claims;
    for (claim, expected) in [
        ("repository", "data/warehouse"),
        ("ref", "refs/heads/main"),
        ("ref_type", "branch"),
        ("sha", MAIN_SHA),
        ("pusher", "alice"),
        ("event", "push"),
        ("delivery_id", id.as_str()),
    ] {
        assert_eq!(claims[claim], expected, "claim {claim}");
    }
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900, "default lifetime 15 min");

    let (status, _, body) = gogs.app.exchange(&token, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credential"]["principal"], format!("gogs:data/warehouse@{MAIN_SHA}"));
    let audit = gogs.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(audit["decision"], "issued");
    assert_eq!(audit["issuer"], "gogs");
    assert_eq!(audit["sha"], MAIN_SHA);
    assert_eq!(audit["claims"]["delivery_id"], id);

    // Single use per role by default.
    let (status, _, body) = gogs.app.exchange(&token, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "token_replayed");
}

/// `[gogs] signing = { vault_transit = ... }`: delivery tokens are signed by a transit key in a
/// real OpenBao (tests/common/openbao.rs, through the production vaultrs client), verify
/// against `/.well-known/jwks.json` with an independent library (PyJWT), grant a `gogs` role,
/// and a token signed before a rotation keeps working while the old version stays published.
#[tokio::test]
async fn delivery_tokens_signed_by_vault_transit_verify_against_the_jwks_and_grant() {
    use common::openbao::{provision, recommended_approle, vault_section, OpenBao};
    const TRANSIT_KEY: &str = "credbroker-gogs";
    let bao = OpenBao::start().await;
    let login = provision(&bao, &common::fresh_database().await, recommended_approle()).await;
    let keys = temp_dir();
    let vault_tables = vault_section(&bao, &keys, &login);
    let signing = format!("signing = {{ vault_transit = \"{TRANSIT_KEY}\", mount = \"transit\", refresh_seconds = 1 }}");
    let gogs = spawn_signing_with(keys, &signing, &vault_tables).await;
    let version_1_kid = bao.transit_kid(TRANSIT_KEY, 1).await;
    let last_signed_version = || bao.requests_to(&format!("transit/sign/{TRANSIT_KEY}")).last().map(|request| request["key_version"].clone());

    let delivery = |git_ref: &'static str| {
        let gogs = &gogs;
        async move {
            let sent = gogs.push("relay", &new_id(), &push_payload(git_ref, MAIN_SHA, "alice")).await;
            assert_eq!(sent.status, 200, "{}", sent.body);
            sent.body["delivery_token"].as_str().expect("relay hook returns the token").to_owned()
        }
    };
    let first = delivery("refs/heads/main").await;
    let kept_for_after_rotation = delivery("refs/heads/main").await;
    assert_eq!(last_signed_version(), Some(json!(1)), "signed by transit, version 1");
    let header = jsonwebtoken::decode_header(&first).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(version_1_kid.as_str()), "kid is the transit key's thumbprint");

    let jwks_url = format!("{}/.well-known/jwks.json", gogs.app.url);
    let issuer = format!("{}/gogs", gogs.app.public_url);
    let validate = |token: String| {
        let (jwks_url, issuer) = (jwks_url.clone(), issuer.clone());
        async move {
            let output = tokio::task::spawn_blocking(move || common::kip768_validate(&jwks_url, common::AUDIENCE, &issuer, &token)).await.unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            serde_json::from_slice::<Value>(&output.stdout).unwrap()["principal"].clone()
        }
    };
    assert_eq!(validate(first.clone()).await, "repo:data/warehouse:ref:refs/heads/main");

    let (status, _, body) = gogs.app.exchange(&first, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credential"]["principal"], format!("gogs:data/warehouse@{MAIN_SHA}"));
    let audit = gogs.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((audit["decision"].as_str(), audit["issuer"].as_str()), (Some("issued"), Some("gogs")));

    // Rotate in Vault: new deliveries are signed with version 2 within refresh_seconds, and
    // version 1 stays in the JWKS while tokens it signed can still be presented.
    bao.write(&format!("transit/keys/{TRANSIT_KEY}/rotate"), json!({})).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let rotated = loop {
        let token = delivery("refs/heads/main").await;
        if jsonwebtoken::decode_header(&token).unwrap().kid.as_deref() != Some(version_1_kid.as_str()) {
            break token;
        }
        assert!(std::time::Instant::now() < deadline, "the rotated transit key was never used");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    assert_eq!(last_signed_version(), Some(json!(2)));
    assert_eq!(jsonwebtoken::decode_header(&rotated).unwrap().kid, Some(bao.transit_kid(TRANSIT_KEY, 2).await));
    let jwks: Value = reqwest::get(&jwks_url).await.unwrap().json().await.unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().filter_map(|k| k["kid"].as_str()).collect();
    let rotated_kid = jsonwebtoken::decode_header(&rotated).unwrap().kid.unwrap();
    assert!(kids.contains(&version_1_kid.as_str()) && kids.contains(&rotated_kid.as_str()), "both versions published: {kids:?}");
    for token in [kept_for_after_rotation, rotated] {
        assert_eq!(validate(token.clone()).await, "repo:data/warehouse:ref:refs/heads/main");
        let (status, _, body) = gogs.app.exchange(&token, json!({"role": "warehouse-deploy"})).await;
        assert_eq!(status, 200, "{body}");
    }
    // A branch the role does not bind is still denied with a transit-signed token.
    let (status, _, body) = gogs.app.exchange(&delivery("refs/heads/feature").await, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn a_push_to_another_branch_or_by_another_pusher_is_denied() {
    let gogs = spawn().await;
    for (git_ref, pusher) in [("refs/heads/feature", "alice"), ("refs/heads/main", "mallory")] {
        let sent = gogs.push("relay", &new_id(), &push_payload(git_ref, MAIN_SHA, pusher)).await;
        assert_eq!(sent.status, 200, "{}", sent.body);
        let token = sent.body["delivery_token"].as_str().expect("relay hook returns the token");
        let (status, _, body) = gogs.app.exchange(token, json!({"role": "warehouse-deploy"})).await;
        assert_eq!(status, 403, "{git_ref} by {pusher}: {body}");
        assert_eq!(body["code"], "access_denied");
        let audit = gogs.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
        assert_eq!(audit["decision"], "denied");
        assert_eq!(audit["issuer"], "gogs");
    }
}

#[tokio::test]
async fn form_deliveries_are_verified_over_the_payload_field() {
    let gogs = spawn().await;
    let payload = push_payload("refs/heads/main", MAIN_SHA, "bob");
    let form: String = url::form_urlencoded::Serializer::new(String::new()).append_pair("payload", &payload).finish();
    let content_type = "application/x-www-form-urlencoded";

    // Gogs signs the payload JSON, not the form body: a signature over the raw body is wrong.
    let over_body = gogs_signature(SECRET, form.as_bytes());
    let sent = gogs.deliver("relay", "push", &new_id(), content_type, form.clone().into_bytes(), Some(over_body)).await;
    assert_eq!(sent.status, 401, "{}", sent.body);

    let id = new_id();
    let signature = gogs_signature(SECRET, payload.as_bytes());
    let sent = gogs.deliver("relay", "push", &id, content_type, form.into_bytes(), Some(signature)).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(gogs.delivery_row(&id).await["pusher"], "bob");
    let token = sent.body["delivery_token"].as_str().unwrap();
    let (status, _, body) = gogs.app.exchange(token, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn bad_missing_and_replayed_signatures_unknown_hooks_and_oversized_bodies_are_refused() {
    let gogs = spawn().await;
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let bytes = payload.as_bytes().to_vec();
    let good = gogs_signature(SECRET, &bytes);
    let cases = [
        ("wrong secret", "relay", Some(gogs_signature("not-the-secret", &bytes)), 401, "invalid_signature"),
        ("missing", "relay", None, 401, "invalid_signature"),
        ("uppercase hex", "relay", Some(good.to_uppercase()), 401, "invalid_signature"),
        ("github-style prefix", "relay", Some(format!("sha256={good}")), 401, "invalid_signature"),
        ("unknown hook", "nope", Some(good.clone()), 404, "not_found"),
    ];
    for (what, hook, signature, status, code) in cases {
        let sent = gogs.deliver(hook, "push", &new_id(), "application/json", bytes.clone(), signature).await;
        assert_eq!(sent.status, status, "{what}: {}", sent.body);
        assert_eq!(sent.body["code"], code, "{what}");
    }
    // A tampered payload under the original signature.
    let tampered = payload.replace("alice", "mallory").into_bytes();
    let sent = gogs.deliver("relay", "push", &new_id(), "application/json", tampered, Some(good.clone())).await;
    assert_eq!(sent.status, 401);

    let oversized = format!("{{\"padding\":\"{}\"}}", "x".repeat(70_000)).into_bytes();
    let signature = gogs_signature(SECRET, &oversized);
    let sent = gogs.deliver("relay", "push", &new_id(), "application/json", oversized, Some(signature)).await;
    assert_eq!((sent.status, sent.body["code"].as_str()), (413, Some("payload_too_large")), "{}", sent.body);
    assert_eq!(gogs.delivery_count().await, 0, "nothing refused is recorded as a delivery");

    // Replay: the same delivery id again, correctly signed, is refused and not recorded twice.
    let id = new_id();
    assert_eq!(gogs.push("relay", &id, &payload).await.status, 200);
    let replay = gogs.push("relay", &id, &payload).await;
    assert_eq!(replay.status, 409, "{}", replay.body);
    assert_eq!(replay.body["code"], "delivery_replayed");
    assert!(replay.body.get("delivery_token").is_none());
    assert_eq!(gogs.delivery_count().await, 1);

    // Signed, but from a repository the hook does not accept.
    let other = payload.replace("data/warehouse", "ops/secrets");
    let sent = gogs.push("warehouse", &new_id(), &other).await;
    assert_eq!(sent.status, 403, "{}", sent.body);
    assert_eq!(gogs.delivery_count().await, 1);
}

/// A create as Gogs sends it: `ref` short, `ref_type`, the new ref's commit; no `pusher_type`.
fn create_payload(branch: &str) -> String {
    serde_json::to_string_pretty(&json!({
        "ref": branch,
        "ref_type": "branch",
        "sha": MAIN_SHA,
        "default_branch": "main",
        "repository": { "id": 17, "name": "warehouse", "full_name": "data/warehouse", "owner": { "username": "data" } },
        "sender": { "id": 5, "login": "alice", "username": "alice" }
    }))
    .unwrap()
}

/// An `issues` event: not acted on.
fn issues_payload() -> String {
    serde_json::to_string_pretty(&json!({
        "action": "opened",
        "number": 4,
        "issue": { "id": 9, "number": 4, "title": format!("Loader is slow ({})", new_id()) },
        "repository": { "id": 17, "name": "warehouse", "full_name": "data/warehouse" },
        "sender": { "id": 5, "login": "alice", "username": "alice" }
    }))
    .unwrap()
}

impl Gogs {
    async fn signed(&self, hook: &str, event: &str, delivery_id: &str, payload: &str) -> Sent {
        let signature = gogs_signature(SECRET, payload.as_bytes());
        self.deliver(hook, event, delivery_id, "application/json", payload.as_bytes().to_vec(), Some(signature)).await
    }

    /// `GET /v1/issuances` as an auditor, waiting until `count` rows are visible (rows show once
    /// every older transaction on the cluster has finished).
    async fn issuances(&self, query: &str, count: usize) -> Vec<Value> {
        let token = self.app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT}));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let response = self.app.client.get(format!("{}/v1/issuances?{query}&limit=1000", self.app.url)).bearer_auth(&token).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let page: Value = response.json().await.unwrap();
            let items = page["items"].as_array().unwrap().clone();
            if items.len() >= count || std::time::Instant::now() > deadline {
                return items;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn gogs_rows(&self, decision: &str) -> i64 {
        sqlx::query_scalar("select count(*) from audit_events where issuer = 'gogs' and decision = $1")
            .bind(decision)
            .fetch_one(&self.app.pool)
            .await
            .unwrap()
    }
}

/// Defect: replay protection keyed only on X-Gogs-Delivery, which Gogs does not sign, so a
/// captured body sent again under a fresh id got a second delivery token (and the automation
/// ran again with it). Now the payload itself is accepted once per hook.
#[tokio::test]
async fn a_signed_body_sent_again_under_a_fresh_delivery_id_is_refused_and_gets_no_token() {
    let gogs = spawn().await;
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let first_id = new_id();
    let first = gogs.push("warehouse", &first_id, &payload).await;
    assert_eq!((first.status, first.body["forward_status"].as_str()), (200, Some("200")), "{}", first.body);

    for _ in 0..2 {
        let replay = gogs.push("warehouse", &new_id(), &payload).await;
        assert_eq!(replay.status, 409, "{}", replay.body);
        assert_eq!(replay.body["code"], "delivery_replayed");
        assert!(replay.body["detail"].as_str().unwrap().contains(&first_id), "names the delivery that brought it: {}", replay.body);
        assert!(replay.body.get("delivery_token").is_none());
    }
    let relayed = gogs.push("relay", &new_id(), &payload).await;
    assert_eq!(relayed.status, 200, "another hook has its own record: {}", relayed.body);
    let replay = gogs.push("relay", &new_id(), &payload).await;
    assert_eq!(replay.status, 409, "{}", replay.body);
    assert!(replay.body.get("delivery_token").is_none());

    assert_eq!(gogs.automation.received.lock().unwrap().len(), 1, "the automation ran once");
    assert_eq!(gogs.delivery_count().await, 2);
    assert_eq!(gogs.gogs_rows("issued").await, 2, "one delivery token per hook");
    assert_eq!(gogs.gogs_rows("denied").await, 3);
}

/// Defect: X-Gogs-Event is not signed, so a create delivery sent as `delete` got a token with
/// `event=delete`, and a push under an event the broker ignores was recorded as that event.
#[tokio::test]
async fn an_event_header_that_disagrees_with_the_body_is_refused() {
    let gogs = spawn().await;
    let create = create_payload("feature");
    let sent = gogs.signed("relay", "delete", &new_id(), &create).await;
    assert_eq!(sent.status, 400, "{}", sent.body);
    assert_eq!(sent.body["code"], "invalid_request");
    assert!(sent.body["detail"].as_str().unwrap().contains("looks like a create event"), "{}", sent.body);
    assert!(sent.body.get("delivery_token").is_none());

    let push = push_payload("refs/heads/main", MAIN_SHA, "alice");
    for event in ["issues", "create", "release"] {
        let sent = gogs.signed("relay", event, &new_id(), &push).await;
        assert_eq!(sent.status, 400, "push body as {event}: {}", sent.body);
        assert!(sent.body["detail"].as_str().unwrap().contains("looks like a push event"), "{}", sent.body);
    }
    let sent = gogs.signed("relay", "push", &new_id(), &issues_payload()).await;
    assert_eq!(sent.status, 400, "{}", sent.body);
    assert_eq!(gogs.delivery_count().await, 0, "nothing refused is recorded as a delivery");

    // Under its own name the same create body is accepted, and the token says create.
    let sent = gogs.signed("relay", "create", &new_id(), &create).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let token = sent.body["delivery_token"].as_str().unwrap();
    let claims: Value = serde_json::from_slice(&base64_url_decode(token.split('.').nth(1).unwrap())).unwrap();
    assert_eq!((claims["event"].as_str(), claims["ref"].as_str()), (Some("create"), Some("refs/heads/feature")));
}

fn base64_url_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).unwrap()
}

/// Concurrent deliveries of one body under different ids (Gogs' redelivery racing a replay, or
/// two replicas): the payload's key in Postgres lets exactly one through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_body_accept_exactly_one() {
    let gogs = spawn().await;
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let signature = gogs_signature(SECRET, payload.as_bytes());
    let sends: Vec<_> = (0..8)
        .map(|_| {
            let request = gogs
                .app
                .client
                .post(format!("{}/v1/hooks/gogs/relay", gogs.app.url))
                .header("content-type", "application/json")
                .header("x-gogs-event", "push")
                .header("x-gogs-delivery", new_id())
                .header("x-gogs-signature", &signature)
                .body(payload.clone());
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for send in sends {
        let (status, body) = send.await.unwrap();
        assert_eq!(status == 200, body.get("delivery_token").is_some(), "{body}");
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409, 409, 409, 409, 409, 409]);
    assert_eq!(gogs.delivery_count().await, 1);
    assert_eq!(gogs.gogs_rows("issued").await, 1);
    assert_eq!(gogs.gogs_rows("denied").await, 7);
}

/// What is sent (name, hook, event, delivery id, content type, body, signature) and what must
/// come of it (status, decision, code).
type Case<'a> = (&'a str, &'a str, &'a str, String, &'a str, String, Option<String>, u16, &'a str, Option<&'a str>);

/// Defect: refused deliveries left no row, and accepted ones lived only in gogs_deliveries.
/// Now each delivery, whatever became of it, is one row of audit_events that auditors read
/// through `GET /v1/issuances` and `credbroker audit query`, and the answer names it.
#[tokio::test]
async fn every_delivery_accepted_or_refused_is_one_audit_row_auditors_can_read() {
    let gogs = spawn().await;
    let accepted = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let accepted_id = new_id();
    let other_push = || push_payload("refs/heads/main", MAIN_SHA, "alice");
    let json = "application/json";
    let signed = |payload: &str| Some(gogs_signature(SECRET, payload.as_bytes()));
    let oversized = format!("{{\"padding\":\"{}\"}}", "x".repeat(70_000));
    let elsewhere = other_push().replace("data/warehouse", "ops/secrets");
    let (push_a, push_b, push_c) = (other_push(), other_push(), other_push());
    let (issues, create) = (issues_payload(), create_payload("x"));
    let cases: Vec<Case> = vec![
        ("accepted", "relay", "push", accepted_id.clone(), json, accepted.clone(), signed(&accepted), 200, "issued", None),
        ("ignored", "warehouse", "issues", new_id(), json, issues.clone(), signed(&issues), 200, "recorded", None),
        (
            "bad signature",
            "relay",
            "push",
            new_id(),
            json,
            push_a.clone(),
            Some(gogs_signature("wrong", push_a.as_bytes())),
            401,
            "denied",
            Some("invalid_signature"),
        ),
        ("unsigned", "relay", "push", new_id(), json, push_b, None, 401, "denied", Some("invalid_signature")),
        ("unknown hook", "nope", "push", new_id(), json, push_c.clone(), signed(&push_c), 404, "denied", Some("not_found")),
        ("too large", "relay", "push", new_id(), json, oversized.clone(), signed(&oversized), 413, "denied", Some("payload_too_large")),
        (
            "malformed delivery id",
            "relay",
            "push",
            "not a uuid".into(),
            json,
            accepted.clone(),
            signed(&accepted),
            400,
            "denied",
            Some("invalid_request"),
        ),
        (
            "other content type",
            "relay",
            "push",
            new_id(),
            "text/plain",
            accepted.clone(),
            signed(&accepted),
            415,
            "denied",
            Some("unsupported_media_type"),
        ),
        ("not JSON", "relay", "push", new_id(), json, "not json".into(), signed("not json"), 400, "denied", Some("invalid_request")),
        ("event mismatch", "relay", "delete", new_id(), json, create.clone(), signed(&create), 400, "denied", Some("invalid_request")),
        ("repository", "warehouse", "push", new_id(), json, elsewhere.clone(), signed(&elsewhere), 403, "denied", Some("access_denied")),
        (
            "same delivery id",
            "relay",
            "push",
            accepted_id.clone(),
            json,
            accepted.clone(),
            signed(&accepted),
            409,
            "denied",
            Some("delivery_replayed"),
        ),
        ("same body", "relay", "push", new_id(), json, accepted.clone(), signed(&accepted), 409, "denied", Some("delivery_replayed")),
    ];
    let mut expected = std::collections::BTreeMap::new();
    let mut token = None;
    for (what, hook, event, id, content_type, body, signature, status, decision, code) in cases {
        let sent = gogs.deliver(hook, event, &id, content_type, body.into_bytes(), signature).await;
        assert_eq!(sent.status, status, "{what}: {}", sent.body);
        assert_eq!(sent.body["code"].as_str(), code, "{what}: {}", sent.body);
        if what == "accepted" {
            token = sent.body["delivery_token"].as_str().map(str::to_owned);
        }
        let audit_id = sent.body["issuance_id"].as_str().unwrap_or_else(|| panic!("{what}: the answer names its row: {}", sent.body)).to_owned();
        assert!(expected.insert(audit_id, (what, decision, code)).is_none());
    }

    let rows = gogs.issuances("issuer=gogs", expected.len()).await;
    assert_eq!(rows.len(), expected.len(), "one row per delivery: {rows:#?}");
    for row in &rows {
        let (what, decision, code) = expected[row["id"].as_str().unwrap()];
        assert_eq!(row["decision"], decision, "{what}: {row}");
        assert_eq!(row["code"].as_str(), code, "{what}: {row}");
        assert_eq!((row["backend"].as_str(), row["target"].as_str()), (Some("gogs"), Some("gogs")), "{what}");
        if what == "accepted" {
            let token = token.as_deref().unwrap();
            assert_eq!(row["credential_sha256"], credbroker::types::sha256_hex(token.as_bytes()));
            assert_eq!(row["subject"], "repo:data/warehouse:ref:refs/heads/main");
            assert_eq!((row["ref"].as_str(), row["sha"].as_str()), (Some("refs/heads/main"), Some(MAIN_SHA)));
            assert!(row["expires_at"].is_string());
        }
    }
    // Claims name the delivery, never its payload or token; an unsigned request names nothing.
    for (id, (what, _, _)) in &expected {
        let row = gogs.app.audit_row(id).await;
        let text = row.to_string();
        assert!(!text.contains("Load orders nightly") && !text.contains("eyJ"), "{what}: {text}");
        match *what {
            "accepted" => {
                assert_eq!(row["claims"]["delivery_id"], accepted_id);
                assert_eq!(row["claims"]["event"], "push");
                assert_eq!(row["claims"]["hook"], "relay");
                assert_eq!(row["claims"]["pusher"], "alice");
                assert_eq!(row["claims"]["payload_sha256"], credbroker::types::sha256_hex(accepted.as_bytes()));
            }
            "ignored" => assert_eq!((row["claims"]["event"].as_str(), row["subject"].as_str()), (Some("issues"), Some("repo:data/warehouse"))),
            "same delivery id" | "same body" | "repository" | "event mismatch" | "not JSON" => {
                assert!(row["claims"]["delivery_id"].is_string(), "{what}: {row}")
            }
            _ => assert!(row["claims"].is_null() && row["subject"].is_null(), "{what}: unverified claims are not claims: {row}"),
        }
    }

    // The same rows through the CLI, reading the database.
    let url = gogs.app.database_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["audit", "query", "--database-url", &url, "--issuer", "gogs", "--json"])
            .env_remove("CREDBROKER_CONFIG")
            .env_remove("CREDBROKER_DATABASE_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed: std::collections::BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected.keys().cloned().collect::<std::collections::BTreeSet<_>>());
}

/// Refusals before the signature matched cannot be held against anyone: they share the budget
/// of unattributed denials (per client address and minute) with bad job tokens, and the rest
/// are counted into one aggregated row.
#[tokio::test]
async fn a_flood_of_bad_signatures_shares_the_unattributed_budget_and_is_aggregated() {
    let keys = temp_dir();
    let key_file = keys.0.join("gogs.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    let signing = format!("signing_key_file = \"{}\"", key_file.display());
    let gogs = spawn_configured(keys, "unattributed_denials_per_minute = 2", &signing, "").await;
    assert_eq!(gogs.app.exchange("garbage", json!({"role": "warehouse-deploy"})).await.0, 401);
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    for _ in 0..5 {
        let sent = gogs.deliver("relay", "push", &new_id(), "application/json", payload.clone().into_bytes(), Some("0".repeat(64))).await;
        assert_eq!((sent.status, sent.body["code"].as_str()), (401, Some("invalid_signature")), "{}", sent.body);
    }
    assert_eq!(gogs.app.audit_count().await, 2, "the budget of two full rows is shared with the bad job token");
    gogs.app.state.broker.audit.flush_unattributed().await.unwrap();
    let (rows, occurrences): (i64, i64) =
        sqlx::query_as("select count(*), sum(occurrences)::bigint from audit_events where code = 'invalid_signature'")
            .fetch_one(&gogs.app.pool)
            .await
            .unwrap();
    assert_eq!((rows, occurrences), (2, 5), "one full row plus one aggregate of four");
    // A signed delivery is never subject to that budget.
    assert_eq!(gogs.push("relay", &new_id(), &payload).await.status, 200);
    assert_eq!(gogs.gogs_rows("issued").await, 1);
}

#[tokio::test]
async fn other_events_are_recorded_and_ignored() {
    let gogs = spawn().await;
    let id = new_id();
    let payload = serde_json::to_string_pretty(&json!({
        "action": "opened",
        "number": 4,
        "issue": { "id": 9, "number": 4, "title": "Loader is slow" },
        "repository": { "id": 17, "name": "warehouse", "full_name": "data/warehouse" },
        "sender": { "id": 5, "login": "alice", "username": "alice" }
    }))
    .unwrap();
    let signature = gogs_signature(SECRET, payload.as_bytes());
    let sent = gogs.deliver("warehouse", "issues", &id, "application/json", payload.into_bytes(), Some(signature)).await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.body["status"], "ignored");
    let row = gogs.delivery_row(&id).await;
    assert_eq!(row["outcome"], "ignored");
    assert_eq!(row["event"], "issues");
    assert!(row["token_sha256"].is_null());
    assert!(gogs.automation.received.lock().unwrap().is_empty(), "ignored events are not forwarded");
}

#[tokio::test]
async fn combined_mode_needs_the_automation_identity_and_a_matching_delivery_token() {
    let gogs = spawn().await;
    let identity = gogs.app.issuer.token_with(json!({"sub": "system:serviceaccount:data:loader"}));
    let delivery = |git_ref: &'static str| {
        let gogs = &gogs;
        async move {
            let sent = gogs.push("relay", &new_id(), &push_payload(git_ref, MAIN_SHA, "alice")).await;
            sent.body["delivery_token"].as_str().unwrap().to_owned()
        }
    };
    let exchange = |bearer: String, delivery: Option<String>| {
        let gogs = &gogs;
        async move {
            let mut request =
                gogs.app.client.post(format!("{}/v1/credentials", gogs.app.url)).bearer_auth(bearer).json(&json!({"role": "warehouse-loader"}));
            if let Some(delivery) = delivery {
                request = request.header("x-credbroker-delivery", delivery);
            }
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };

    let main = delivery("refs/heads/main").await;
    let (status, body) = exchange(identity.clone(), Some(main.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credential"]["principal"], format!("loader:data/warehouse@{MAIN_SHA}"));
    let audit = gogs.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(audit["issuer"], "gitlab");
    assert_eq!(audit["claims"]["delivery_sha"], MAIN_SHA);
    assert_eq!(audit["claims"]["delivery_repository"], "data/warehouse");

    // The same delivery token again for this role: single use.
    let other_identity = gogs.app.issuer.token_with(json!({"sub": "system:serviceaccount:data:loader"}));
    let (status, body) = exchange(other_identity, Some(main.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("already used"), "{body}");

    // No delivery token; one for another branch; the delivery token alone as the identity.
    let fresh = || gogs.app.issuer.token_with(json!({"sub": "system:serviceaccount:data:loader"}));
    let (status, body) = exchange(fresh(), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("X-Credbroker-Delivery"), "{body}");
    let (status, body) = exchange(fresh(), Some(delivery("refs/heads/feature").await)).await;
    assert_eq!(status, 403, "{body}");
    let stolen = delivery("refs/heads/main").await;
    let (status, body) = exchange(stolen.clone(), Some(stolen)).await;
    assert_eq!(status, 403, "a delivery token alone is useless: {body}");
    // Another identity with a good delivery token.
    let intruder = gogs.app.issuer.token_with(json!({"sub": "system:serviceaccount:data:intruder"}));
    let (status, body) = exchange(intruder, Some(delivery("refs/heads/main").await)).await;
    assert_eq!(status, 403, "{body}");
}

/// A delivery token re-signed with the broker's own key but a `crit` header is refused (RFC
/// 7515 section 4.1.11); the same claims and key without `crit` are accepted, so `crit` is the
/// only thing wrong with it.
#[tokio::test]
async fn delivery_tokens_with_critical_header_extensions_are_refused() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let gogs = spawn().await;
    let sent = gogs.push("relay", &new_id(), &push_payload("refs/heads/main", MAIN_SHA, "alice")).await;
    let genuine = sent.body["delivery_token"].as_str().unwrap().to_owned();
    let kid = jsonwebtoken::decode_header(&genuine).unwrap().kid.unwrap();
    let claims = genuine.split('.').nth(1).unwrap().to_owned();
    let resign = |header: Value| {
        let message = format!("{}.{claims}", URL_SAFE_NO_PAD.encode(header.to_string()));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(rsa_pem(1).as_bytes()).unwrap();
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::RS256).unwrap();
        format!("{message}.{signature}")
    };

    let critical =
        resign(json!({"alg": "RS256", "typ": "JWT", "kid": kid, "crit": ["urn:example:must-understand"], "urn:example:must-understand": "1"}));
    let (status, _, body) = gogs.app.exchange(&critical, json!({"role": "warehouse-deploy"})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("`crit`"), "{body}");
    let (status, _, body) =
        gogs.app.exchange(&resign(json!({"alg": "RS256", "typ": "JWT", "kid": kid, "crit": []})), json!({"role": "warehouse-deploy"})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");

    let plain = resign(json!({"alg": "RS256", "typ": "JWT", "kid": kid}));
    let (status, _, body) = gogs.app.exchange(&plain, json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 200, "{body}");
}

/// A sink that refuses while `down` is set: the publisher's claim, backoff and ordering rules
/// on their own (the real Kafka sink against a real broker is tests/events_kafka.rs).
#[derive(Default)]
struct FlakySink {
    down: AtomicBool,
    published: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl EventSink for FlakySink {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<(), String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("connection refused".into());
        }
        self.published.lock().unwrap().extend(events.iter().map(|e| (e.kind.clone(), e.key.clone())));
        Ok(())
    }
}

#[tokio::test]
async fn outbox_keeps_issued_and_delivery_events_through_a_sink_outage() {
    let gogs = spawn().await;
    let pool = gogs.app.pool.clone();
    credbroker::audit::outbox::set_outbox_enabled(&pool, true).await.unwrap();

    let id = new_id();
    let sent = gogs.push("relay", &id, &push_payload("refs/heads/main", MAIN_SHA, "alice")).await;
    // The delivery token is a credential the broker issued: its audit row is an event too.
    let delivery_row_id = sent.body["issuance_id"].as_str().unwrap().to_owned();
    let (status, _, body) = gogs.app.exchange(sent.body["delivery_token"].as_str().unwrap(), json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 200, "{body}");
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    // A denial is not an event for the stream.
    let (status, _, _) = gogs.app.exchange("garbage", json!({"role": "warehouse-deploy"})).await;
    assert_eq!(status, 401);

    let sink = Arc::new(FlakySink::default());
    sink.down.store(true, Ordering::SeqCst);
    let settings = PublisherSettings { backoff_base: std::time::Duration::from_millis(500), ..PublisherSettings::default() };
    let publisher = Publisher::new(pool.clone(), sink.clone(), settings);
    assert_eq!(publisher.run_once().await.unwrap(), Pass::Failed(3));
    // Backed off: not due again at once.
    assert_eq!(publisher.run_once().await.unwrap(), Pass::Idle);
    let (attempts, error): (i32, String) =
        sqlx::query_as("select max(attempts), max(last_error) from event_outbox where delivered_at is null").fetch_one(&pool).await.unwrap();
    assert_eq!((attempts, error.as_str()), (1, "connection refused"));

    sink.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(publisher.run_once().await.unwrap(), Pass::Delivered(3));
    assert_eq!(
        *sink.published.lock().unwrap(),
        vec![("gogs.delivery".to_owned(), id), ("credential.issued".to_owned(), delivery_row_id), ("credential.issued".to_owned(), issuance_id)],
        "every event, once each, in commit order"
    );
    assert_eq!(publisher.run_once().await.unwrap(), Pass::Idle);
    let pending: i64 = sqlx::query_scalar("select count(*) from event_outbox where delivered_at is null").fetch_one(&pool).await.unwrap();
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn two_publishers_never_claim_the_same_event() {
    let gogs = spawn().await;
    let pool = gogs.app.pool.clone();
    credbroker::audit::outbox::set_outbox_enabled(&pool, true).await.unwrap();
    for _ in 0..20 {
        let sent = gogs.push("relay", &new_id(), &push_payload("refs/heads/main", MAIN_SHA, "alice")).await;
        assert_eq!(sent.status, 200);
    }
    let sink = Arc::new(FlakySink::default());
    let settings = PublisherSettings { batch_size: 3, ..PublisherSettings::default() };
    let publishers: Vec<Publisher> = (0..4).map(|_| Publisher::new(pool.clone(), sink.clone(), settings)).collect();
    let drains = publishers.iter().map(|publisher| async move { while publisher.run_once().await.unwrap() != Pass::Idle {} });
    futures_join_all(drains).await;
    // Each delivery: its gogs.delivery event and its delivery token's credential.issued.
    let mut keys: Vec<String> = sink.published.lock().unwrap().iter().map(|(_, key)| key.clone()).collect();
    assert_eq!(keys.len(), 40);
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 40, "no event published twice");
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for future in futures {
        set.push(future);
    }
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = set.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        pinned.retain_mut(|future| future.as_mut().poll(cx).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Stops the example script when the test ends, however it ends (by PID, never by name).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it (openssl CLI); returns (chain, key) paths.
fn loopback_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let output = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=credbroker test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "loader-key.pem", "-out", "loader.csr"]);
    std::fs::write(dir.join("loader.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "loader.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "loader.ext",
        "-out",
        "loader.pem",
    ]);
    (dir.join("loader.pem"), dir.join("loader-key.pem"))
}

/// Waits until `path` holds `needle`, then returns the file's text.
async fn file_containing(path: &std::path::Path, needle: &str, timeout: std::time::Duration) -> String {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {needle:?} in {}: {text}", path.display());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// examples/gogs-automation run for real: the shipped `credbroker.toml` fragment and policies
/// (only the site-specific issuer URL, key path and forward URL rewritten) in the real broker,
/// the shipped `automation.py` as the forward target, a push signed exactly as Gogs signs it.
/// The script receives the forwarded delivery, exchanges its own identity token plus the
/// delivery token for a Kafka credential (role `warehouse-loader`) and runs `load.sh` with it.
#[tokio::test]
async fn the_example_automation_receives_the_forwarded_push_exchanges_and_runs_its_job() {
    let example = common::repo_path("examples/gogs-automation");
    let work = temp_dir();
    // The loader's own identity: a Kubernetes-style service-account token from a real OIDC
    // issuer served over HTTP (discovery + JWKS), registered as the example's `kubernetes`.
    let kubernetes = common::TestIssuer::start().await;
    let identity_token = kubernetes.token_with(json!({"sub": "system:serviceaccount:data:loader"}));
    let identity_file = work.0.join("identity-token");
    std::fs::write(&identity_file, &identity_token).unwrap();
    let key_file = work.0.join("gogs-delivery.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    let script_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    // The broker forwards to https URLs (as the example's forward_url is): the script serves
    // TLS with a certificate from a CA of this test, which the broker trusts through
    // SSL_CERT_FILE (read by its TLS roots loader; this test runs in a process of its own).
    let (certificate, certificate_key) = loopback_certificate(&work.0);
    std::env::set_var("SSL_CERT_FILE", work.0.join("ca.pem"));

    let fragment = std::fs::read_to_string(example.join("credbroker.toml")).unwrap();
    let tables = [
        ("https://kubernetes.default.svc.cluster.local", kubernetes.url.clone()),
        ("keys/gogs-delivery.pem", key_file.display().to_string()),
        ("https://loader.internal:8090/", format!("https://127.0.0.1:{script_port}/")),
    ]
    .iter()
    .fold(fragment, |text, (from, to)| {
        assert!(text.contains(from), "the example's credbroker.toml no longer contains {from:?}");
        text.replace(from, to)
    });
    // The fragment reads the hook secret from the environment, as the README tells.
    std::env::set_var("GOGS_WAREHOUSE_HOOK_SECRET", SECRET);
    let policies = std::fs::read_to_string(example.join("policies/warehouse.toml")).unwrap();
    let app = TestApp::spawn_full("", &tables, &policies, None).await;

    // The job: records the environment it was given, then runs the example's load.sh.
    let job_env = work.0.join("job-env");
    let script_out = work.0.join("automation.out");
    let script_err = work.0.join("automation.err");
    let child = std::process::Command::new("python3")
        .arg(example.join("automation.py"))
        .args(["--listen", &format!("127.0.0.1:{script_port}")])
        .arg("--tls-cert")
        .arg(&certificate)
        .arg("--tls-key")
        .arg(&certificate_key)
        .args(["--", "sh", "-c", "env > \"$0\" && exec sh \"$1\""])
        .arg(&job_env)
        .arg(example.join("load.sh"))
        .env("CREDBROKER_URL", &app.url)
        .env("CREDBROKER_ROLE", "warehouse-loader")
        .env("IDENTITY_TOKEN_FILE", &identity_file)
        .stdout(std::fs::File::create(&script_out).unwrap())
        .stderr(std::fs::File::create(&script_err).unwrap())
        .spawn()
        .expect("python3");
    let _script = ChildGuard(child);
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", script_port)).await.is_err() {
        assert!(started.elapsed().as_secs() < 10, "automation.py did not listen: {}", std::fs::read_to_string(&script_err).unwrap_or_default());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // A push as Gogs delivers it: JSON body, X-Gogs-* headers, HMAC by Python's hmac module.
    let id = new_id();
    let payload = push_payload("refs/heads/main", MAIN_SHA, "alice");
    let response = app
        .client
        .post(format!("{}/v1/hooks/gogs/warehouse", app.url))
        .header("content-type", "application/json")
        .header("x-gogs-event", "push")
        .header("x-gogs-delivery", &id)
        .header("x-gogs-signature", gogs_signature(SECRET, payload.as_bytes()))
        .header("x-github-event", "push")
        .header("x-github-delivery", &id)
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["forward_status"], "202", "automation.py accepts and works after answering: {answer}");
    assert!(answer.get("delivery_token").is_none(), "Gogs' delivery history never sees the token: {answer}");

    let out = file_containing(&script_out, "job exited", std::time::Duration::from_secs(30)).await;
    let errors = std::fs::read_to_string(&script_err).unwrap_or_default();
    assert!(out.contains(&format!("delivery {id}: job exited 0")), "{out}\n{errors}");
    let principal = format!("loader:data/warehouse@{MAIN_SHA}");
    assert!(
        out.contains(&format!("loading data/warehouse at {MAIN_SHA} (refs/heads/main) as {principal}")),
        "load.sh ran with the delivery and the credential: {out}\n{errors}"
    );

    // The job's environment held a real credential: a Kafka OAUTHBEARER token that KIP-768
    // validation (PyJWT, JWKS over HTTP) accepts, bound to that repository and commit.
    let env_text = std::fs::read_to_string(&job_env).unwrap();
    let env: std::collections::HashMap<&str, &str> = env_text.lines().filter_map(|line| line.split_once('=')).collect();
    assert_eq!(env.get("GOGS_REPOSITORY"), Some(&"data/warehouse"));
    assert_eq!(env.get("GOGS_REF"), Some(&"refs/heads/main"));
    assert_eq!(env.get("GOGS_SHA"), Some(&MAIN_SHA));
    assert_eq!(env.get("KAFKA_PRINCIPAL"), Some(&principal.as_str()));
    let kafka_token = env.get("KAFKA_OAUTHBEARER_TOKEN").expect("the credential is in the job's environment").to_string();
    let (jwks_url, issuer, token) = (format!("{}/.well-known/jwks.json", app.url), app.public_url.clone(), kafka_token.clone());
    let output = tokio::task::spawn_blocking(move || common::kip768_validate(&jwks_url, "kafka-test", &issuer, &token)).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdict["principal"], principal.as_str());

    // The audit log holds the delivery and the issuance, tied together, and nothing secret.
    let delivery = sqlx::query_scalar::<_, Value>("select to_jsonb(d) from gogs_deliveries d where delivery_id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(delivery["forward_status"], "202");
    assert_eq!(delivery["after_sha"], MAIN_SHA);
    assert_eq!(delivery["payload_sha256"], credbroker::types::sha256_hex(payload.as_bytes()));
    let issued: Vec<Value> = sqlx::query_scalar(&format!("select {AUDIT_ROW} from audit_events a where decision = 'issued' and issuer <> 'gogs'"))
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(issued.len(), 1, "{issued:?}");
    let issued = &issued[0];
    assert_eq!(issued["role"], "warehouse-loader");
    assert_eq!(issued["issuer"], "kubernetes");
    assert_eq!(issued["subject"], "system:serviceaccount:data:loader");
    assert_eq!(issued["claims"]["delivery_id"], id);
    assert_eq!(issued["claims"]["delivery_sha"], MAIN_SHA);
    assert_eq!(issued["claims"]["delivery_repository"], "data/warehouse");
    assert_eq!(issued["credential_sha256"], credbroker::types::sha256_hex(kafka_token.as_bytes()));
    assert!(out.contains(&format!("credential {}", issued["id"].as_str().unwrap())), "the script logs the issuance id: {out}");
    let everything: String = sqlx::query_scalar(
        "select coalesce((select jsonb_agg(to_jsonb(a))::text from audit_events a), '') || coalesce((select jsonb_agg(to_jsonb(d))::text from gogs_deliveries d), '')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let delivery_token_sha = delivery["token_sha256"].as_str().expect("token fingerprint recorded").to_owned();
    for (what, secret) in [("credential", kafka_token.as_str()), ("identity token", identity_token.as_str()), ("hook secret", SECRET)] {
        assert!(!everything.contains(secret), "the audit log holds the {what}");
        assert!(!out.contains(secret) && !errors.contains(secret), "the script logged the {what}");
    }
    // The delivery token is only fingerprinted: no stored JWT at all (a JWT begins with the
    // base64url of its header, `{"typ"...` or `{"alg"...`).
    assert!(!everything.contains("eyJ0eXAi") && !everything.contains("eyJhbGci"), "no token of any kind is stored");
    assert_eq!(delivery_token_sha.len(), 64);
    // The delivery's own row: the delivery token, by fingerprint, and what the delivery said.
    let delivery_row: Value =
        sqlx::query_scalar(&format!("select {AUDIT_ROW} from audit_events a where issuer = 'gogs'")).fetch_one(&app.pool).await.unwrap();
    assert_eq!(delivery_row["decision"], "issued");
    assert_eq!(delivery_row["credential_sha256"], delivery_token_sha.as_str());
    assert_eq!(delivery_row["claims"]["delivery_id"], id);
    assert_eq!(delivery_row["sha"], MAIN_SHA);
    assert_eq!(delivery["audit_id"], delivery_row["id"]);

    // Gogs' "Redeliver" of the same delivery is refused and the job does not run again.
    let replay = app
        .client
        .post(format!("{}/v1/hooks/gogs/warehouse", app.url))
        .header("content-type", "application/json")
        .header("x-gogs-event", "push")
        .header("x-gogs-delivery", &id)
        .header("x-gogs-signature", gogs_signature(SECRET, payload.as_bytes()))
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 409);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&script_out).unwrap().matches("job exited").count(), 1);
}
