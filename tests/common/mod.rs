//! Test harness: a real Postgres database per test, a real OIDC issuer on 127.0.0.1:0
//! (discovery + JWKS over HTTP, signing GitLab-shaped tokens), and the real broker built
//! in-process on port 0.
#![allow(dead_code)]

pub mod looker_standin;
pub mod moto;
pub mod openbao;
pub mod tansu;
pub mod vault_standin;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use credbroker::config::Config;
use credbroker::signing::SigningKey;
use credbroker::startup::{Application, ServeOptions};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{json, Map, Value};
use sqlx::{Connection, PgPool};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

pub const AUDIENCE: &str = "credbroker";

/// Waits until `check` holds, failing the test after `timeout`.
pub async fn eventually(what: &str, timeout: std::time::Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// RSA key generation is slow; each test process makes its keys once.
pub fn rsa_pem(slot: usize) -> &'static str {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..3)
            .map(|_| {
                let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
                key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
            })
            .collect()
    })[slot]
}

// ---------------------------------------------------------------- Postgres

/// A fresh database on the cluster scripts/test.sh started.
pub async fn fresh_database() -> String {
    let admin_url = std::env::var("CREDBROKER_TEST_DATABASE_URL")
        .expect("CREDBROKER_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts Postgres");
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("connect to the test cluster");
    sqlx::query(&format!("create database {name}")).execute(&mut admin).await.unwrap();
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// A row as the writer stores it; the columns a filter looks at are set from `values`.
pub async fn seed_audit_row(pool: &PgPool, values: Value) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, code, role, target, backend, issuer, subject,
             project_path, namespace_path, pipeline_id, job_id, sha, user_login, credential_sha256, expires_at, claims, detail,
             renews_issuance_id, about_issuance_id)
         select $1, coalesce(($2->>'occurred_at')::timestamptz, now()), 'seed', coalesce($2->>'decision', 'denied'), $2->>'code',
             $2->>'role', $2->>'target', $2->>'backend', $2->>'issuer', $2->>'subject', $2->>'project_path',
             $2->>'namespace_path', $2->>'pipeline_id', $2->>'job_id', $2->>'sha', $2->>'user_login',
             $2->>'credential_sha256', case when $2->>'decision' = 'issued' then now() + interval '1 hour' end, $2->'claims', $2->>'detail',
             ($2->>'renews_issuance_id')::uuid, ($2->>'about_issuance_id')::uuid",
    )
    .bind(id)
    .bind(&values)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// An audit row of `audit_events a` as JSON, its claims under `claims` wherever they are stored
/// (`claims_json` since migration 0023, `claims` before), as the broker reads them.
pub const AUDIT_ROW: &str = "(to_jsonb(a) - 'claims_json' || jsonb_build_object('claims', coalesce(a.claims_json::jsonb, a.claims)))";

/// A TCP proxy in front of Postgres that a test can cut, to stage an outage without
/// disturbing the cluster other tests share.
pub struct PostgresProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl PostgresProxy {
    pub async fn start(database_url: &str) -> (Self, String) {
        let upstream = url::Url::parse(database_url).unwrap();
        let upstream_addr = format!("{}:{}", upstream.host_str().unwrap(), upstream.port().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (accept_up, accept_connections) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream_addr = upstream_addr.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_connections.lock().unwrap().push(task);
            }
        });
        let mut proxied = upstream.clone();
        proxied.set_port(Some(port)).unwrap();
        (Self { port, up, connections }, proxied.to_string())
    }

    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- OIDC issuer

pub struct TestIssuer {
    pub url: String,
    state: Arc<IssuerState>,
}

struct IssuerState {
    url: String,
    /// Slots of `rsa_pem` currently published.
    published: Mutex<Vec<usize>>,
    pub fetches: AtomicUsize,
}

impl TestIssuer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}/gitlab", listener.local_addr().unwrap().port());
        let state = Arc::new(IssuerState { url: url.clone(), published: Mutex::new(vec![0]), fetches: AtomicUsize::new(0) });
        let router = Router::new()
            .route("/gitlab/.well-known/openid-configuration", get(discovery))
            .route("/gitlab/oauth/discovery/keys", get(keys))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    pub fn publish(&self, slots: &[usize]) {
        *self.state.published.lock().unwrap() = slots.to_vec();
    }

    pub fn key(&self, slot: usize) -> SigningKey {
        SigningKey::from_pem(rsa_pem(slot).as_bytes()).unwrap()
    }

    /// GitLab's claims for a protected-branch job of platform/orders, `exp` one hour out.
    pub fn claims(&self) -> Map<String, Value> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({
            "iss": self.url, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 3600,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": "project_path:platform/orders:ref_type:branch:ref:main",
            "namespace_id": "7", "namespace_path": "platform",
            "project_id": "42", "project_path": "platform/orders",
            "job_project_id": "42", "job_project_path": "platform/orders",
            "job_namespace_id": "7", "job_namespace_path": "platform",
            "user_id": "3", "user_login": "alice", "user_email": "alice@example.com", "user_access_level": "developer",
            "pipeline_id": "9001", "pipeline_source": "push", "job_id": "123456",
            "ref": "main", "ref_type": "branch", "ref_path": "refs/heads/main", "ref_protected": "true",
            "runner_id": 42, "runner_environment": "self-hosted",
            "sha": "0123456789abcdef0123456789abcdef01234567", "project_visibility": "private",
            "ci_config_ref_uri": "gitlab.example.com/platform/orders//.gitlab-ci.yml@refs/heads/main",
            "ci_config_sha": "0123456789abcdef0123456789abcdef01234567",
        })
        .as_object()
        .unwrap()
        .clone()
    }

    pub fn sign(&self, claims: &Map<String, Value>) -> String {
        self.key(0).sign(claims).unwrap()
    }

    pub fn token(&self) -> String {
        self.sign(&self.claims())
    }

    pub fn token_with(&self, changes: Value) -> String {
        let mut claims = self.claims();
        for (name, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.remove(name);
            } else {
                claims.insert(name.clone(), value.clone());
            }
        }
        self.sign(&claims)
    }
}

async fn discovery(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    Json(json!({
        "issuer": state.url,
        "jwks_uri": format!("{}/oauth/discovery/keys", state.url),
        "authorization_endpoint": format!("{}/oauth/authorize", state.url),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn keys(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let slots = state.published.lock().unwrap().clone();
    let keys: Vec<Value> =
        slots.into_iter().map(|slot| serde_json::to_value(SigningKey::from_pem(rsa_pem(slot).as_bytes()).unwrap().public_jwk()).unwrap()).collect();
    Json(json!({ "keys": keys }))
}

// ---------------------------------------------------------------- broker

pub const POLICIES: &str = r#"
[[role]]
name = "orders-producer"
backend = "kafka"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
principal = "ci:{job_project_path}"
scope = "orders.write"
[role.claims]
job_project_path = "platform/orders"
ref_protected = "true"

[[role]]
name = "orders-strict"
backend = "kafka"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
min_ttl = "10m"
principal = "ci:{job_project_path}"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "orders-multi"
backend = "kafka"
issuer = "gitlab"
default_ttl = "5m"
max_ttl = "10m"
max_uses_per_token = 3
principal = "ci:{job_project_path}"
[role.claims]
job_project_path = "platform/*"
runner_id = 42

[[role]]
name = "by-environment"
backend = "kafka"
issuer = "gitlab"
default_ttl = "5m"
max_ttl = "10m"
principal = "ci:{environment}"
[role.claims]
job_namespace_path = "platform"
"#;

pub struct TestApp {
    pub url: String,
    pub public_url: String,
    pub issuer: TestIssuer,
    pub database_url: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub state: credbroker::http::AppState,
    pub dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("credbroker-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    TempDir(dir)
}

/// The broker's configuration as a test writes it; `extra` lands at the top level.
pub fn config_text(issuer_url: &str, database_url: &str, public_url: &str, extra: &str) -> String {
    config_text_with_tables(issuer_url, database_url, public_url, extra, "")
}

/// As [`config_text`], with `tables` (e.g. `[vault]`, more `[backends.x]`) appended.
pub fn config_text_with_tables(issuer_url: &str, database_url: &str, public_url: &str, extra: &str, tables: &str) -> String {
    format!(
        r#"
{extra}
listen = "127.0.0.1:0"
public_url = "{public_url}"
audience = "{AUDIENCE}"
database_url = "{database_url}"
policy_dir = "policies"

[[issuers]]
name = "gitlab"
issuer = "{issuer_url}"

[backends.kafka]
type = "kafka_oauthbearer"
audience = "kafka-test"
signing_key_file = "kafka.pem"
max_ttl = "1h"

{tables}
"#
    )
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with("", None).await
    }

    /// `extra`: top-level config lines; `database_url`: override (e.g. through a proxy).
    pub async fn spawn_with(extra: &str, database_url: Option<String>) -> Self {
        Self::spawn_full(extra, "", POLICIES, database_url).await
    }

    /// `tables`: config tables appended after the kafka backend; `policies`: the policy file.
    pub async fn spawn_full(extra: &str, tables: &str, policies: &str, database_url: Option<String>) -> Self {
        let issuer = TestIssuer::start().await;
        let database_url = match database_url {
            Some(url) => url,
            None => fresh_database().await,
        };
        let dir = temp_dir();
        std::fs::write(dir.0.join("kafka.pem"), rsa_pem(2)).unwrap();
        std::fs::write(dir.0.join("policies/test.toml"), policies).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tables.contains("[tls]") { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let text = config_text_with_tables(&issuer.url, &database_url, &url, extra, tables);
        let config_path = dir.0.join("credbroker.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::parse(&text, &config_path, std::iter::empty()).unwrap();
        let application = Application::build_on(listener, config, ServeOptions::default()).await.unwrap();
        let state = application.state().clone();
        tokio::spawn(application.run_until_stopped());
        let pool = PgPool::connect(&database_url).await.unwrap();
        Self { url: url.clone(), public_url: url, issuer, database_url, pool, client: reqwest::Client::new(), state, dir }
    }

    pub async fn exchange(&self, token: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self.client.post(format!("{}/v1/credentials", self.url)).bearer_auth(token).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// The audit row of an exchange, by the id the response carried.
    pub async fn audit_row(&self, issuance_id: &str) -> Value {
        let id = uuid::Uuid::parse_str(issuance_id).unwrap();
        sqlx::query_scalar::<_, Value>(&format!("select {AUDIT_ROW} from audit_events a where id = $1"))
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("no audit row for {issuance_id}: {e}"))
    }

    pub async fn audit_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from audit_events").fetch_one(&self.pool).await.unwrap()
    }
}

/// PEERS.md: no Kafka broker here validates OAUTHBEARER, so a minted token is validated the
/// way KIP-768 does with an independent library (PyJWT, installed by scripts/test.sh).
/// Blocking: call it from `spawn_blocking`.
pub fn kip768_validate(jwks_url: &str, audience: &str, issuer: &str, token: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .arg(repo_path("tests/kip768_validate.py"))
        .args([jwks_url, audience, issuer])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs PyJWT)");
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Builds the backends in `tables` and loads `dir/policies` against them, offline (nothing is
/// contacted): for tests of load-time refusals.
pub fn load_offline(dir: &Path, tables: &str) -> anyhow::Result<()> {
    let text = format!(
        "listen = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:1\"\naudience = \"credbroker\"\n\
         database_url = \"postgres://127.0.0.1:1/none\"\npolicy_dir = \"policies\"\n\
         [[issuers]]\nname = \"gitlab\"\nissuer = \"https://gitlab.example.com\"\n{tables}"
    );
    let path = dir.join("credbroker.toml");
    let config = Config::parse(&text, &path, std::iter::empty())?;
    let backends = credbroker::backend::Backends::build(&config, None)?;
    credbroker::startup::load_policies(&config, &backends, false)?;
    Ok(())
}

// ---------------------------------------------------------------- the binary

/// A `credbroker serve` process, killed (SIGKILL) when dropped.
pub struct BrokerProcess(pub std::process::Child);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary with `config` on 127.0.0.1:`port`, its stderr appended to `log`, and
/// waits until it is ready.
pub async fn start_binary(config: &Path, port: u16, log: &Path) -> BrokerProcess {
    start_binary_at(config, &format!("http://127.0.0.1:{port}"), log, &reqwest::Client::new(), &[]).await
}

/// As [`start_binary`], on `url`'s port, asking for readiness there with `client` (one that
/// trusts the broker's TLS certificate, say), with more flags for `serve` (`--dev`).
pub async fn start_binary_at(config: &Path, url: &str, log: &Path, client: &reqwest::Client, serve_flags: &[&str]) -> BrokerProcess {
    let port = url::Url::parse(url).unwrap().port().expect("a URL with a port");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .args(serve_flags)
        .env("CREDBROKER_LISTEN", format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap();
    let child = BrokerProcess(child);
    for _ in 0..150 {
        if let Ok(response) = client.get(format!("{url}/readyz")).send().await {
            if response.status() == 200 {
                return child;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("broker did not become ready: {}", std::fs::read_to_string(log).unwrap_or_default());
}
