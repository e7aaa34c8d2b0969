//! A STAND-IN for HashiCorp Vault, not Vault, for the two cases a real OpenBao
//! (tests/common/openbao.rs) cannot serve here (PEERS.md): Kubernetes auth, which needs a
//! Kubernetes TokenReview API nothing here runs, and the Snowflake database plugin's key-pair
//! answer (OpenBao ships no Snowflake plugin). It serves that slice of Vault's documented HTTP
//! API with Vault's field names, envelope (`request_id`, `lease_id`, `lease_duration`,
//! `renewable`, `data`, `wrap_info`, `warnings`, `auth`), error bodies (`{"errors": [...]}`) and
//! status codes, and the broker talks to it through its production `vaultrs` client. Each route
//! names the Vault API page it follows:
//!
//! - GET  sys/health                 https://developer.hashicorp.com/vault/api-docs/system/health
//! - POST auth/approle/login         https://developer.hashicorp.com/vault/api-docs/auth/approle#login-with-approle
//! - POST auth/:mount/login (kubernetes) https://developer.hashicorp.com/vault/api-docs/auth/kubernetes#login
//!   (`role` and `jwt` both required; an unknown role is 400 `invalid role name`, a service-account
//!   token the TokenReview API rejects is 403 `permission denied`)
//! - POST auth/token/renew-self      https://developer.hashicorp.com/vault/api-docs/auth/token#renew-a-token-self
//! - GET  auth/token/lookup-self     https://developer.hashicorp.com/vault/api-docs/auth/token#lookup-a-token-self
//! - GET  database/creds/:name       https://developer.hashicorp.com/vault/api-docs/secret/databases#generate-credentials
//!   (the Snowflake plugin's `rsa_private_key` credential type answers `rsa_private_key`, not `password`)
//! - PUT  sys/leases/renew           https://developer.hashicorp.com/vault/api-docs/system/leases#renew-lease
//! - PUT  sys/leases/revoke          https://developer.hashicorp.com/vault/api-docs/system/leases#revoke-lease
//!
//! Simplifications, each outside what those two cases rely on: no ACL policies, a Kubernetes
//! login accepts exactly one token string per mount (where Vault would ask the TokenReview API),
//! and database users are not created anywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::net::TcpListener;

pub const ROLE_ID: &str = "c3ab3d8a-role-id";
pub const SECRET_ID: &str = "7e0a6b2c-secret-id";

#[derive(Clone)]
pub struct VaultStandin {
    pub url: String,
    pub state: Arc<Mutex<StandinState>>,
}

pub struct StandinState {
    pub token_ttl: u64,
    pub token_max_ttl: u64,
    pub tokens: HashMap<String, TokenEntry>,
    pub logins: usize,
    pub db_roles: HashMap<String, DbRole>,
    pub leases: HashMap<String, LeaseEntry>,
    /// Kubernetes auth mounts, by mount path.
    pub kubernetes_mounts: HashMap<String, KubernetesMount>,
    /// (mount, role, jwt) of every login at a Kubernetes mount, accepted or not.
    pub jwt_logins: Vec<(String, Option<String>, String)>,
}

/// A Kubernetes auth mount with one role.
pub struct KubernetesMount {
    pub role: String,
    /// The one service-account token this mount accepts now (a projected token is replaced
    /// on rotation, and the old one stops validating).
    pub accepted_jwt: String,
}

pub struct TokenEntry {
    pub expires: Instant,
    pub max_expires: Instant,
    pub accessor: String,
}

#[derive(Clone)]
pub struct DbRole {
    pub default_ttl: u64,
    pub max_ttl: u64,
    pub renewable: bool,
    /// Vault's Snowflake plugin with `credential_type = "rsa_private_key"`.
    pub key_pair: bool,
}

pub struct LeaseEntry {
    pub role: String,
    pub expires: Instant,
    pub max_expires: Instant,
    pub renewable: bool,
    pub revoked_at: Option<OffsetDateTime>,
    pub username: String,
}

impl VaultStandin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(StandinState {
            token_ttl: 3600,
            token_max_ttl: 7200,
            tokens: HashMap::new(),
            logins: 0,
            db_roles: HashMap::new(),
            leases: HashMap::new(),
            kubernetes_mounts: HashMap::new(),
            jwt_logins: Vec::new(),
        }));
        let router = Router::new().route("/v1/{*path}", any(dispatch)).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    pub fn with<R>(&self, change: impl FnOnce(&mut StandinState) -> R) -> R {
        change(&mut self.state.lock().unwrap())
    }

    pub fn add_db_role(&self, name: &str, role: DbRole) {
        self.with(|s| s.db_roles.insert(name.to_owned(), role));
    }

    /// Enables a Kubernetes auth mount with one role, accepting `jwt`; calling it again
    /// replaces the accepted token (a rotation).
    pub fn set_kubernetes_mount(&self, mount: &str, role: &str, jwt: &str) {
        self.with(|s| s.kubernetes_mounts.insert(mount.to_owned(), KubernetesMount { role: role.to_owned(), accepted_jwt: jwt.to_owned() }));
    }

    /// Every token stops working, as if revoked or expired.
    pub fn revoke_all_tokens(&self) {
        self.with(|s| s.tokens.clear());
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let errors: Vec<&str> = if message.is_empty() { vec![] } else { vec![message] };
    (status, Json(json!({ "errors": errors }))).into_response()
}

fn envelope(data: Value, lease_id: &str, lease_duration: u64, renewable: bool, auth: Value, warnings: Option<Vec<String>>) -> Response {
    Json(json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": lease_id,
        "renewable": renewable,
        "lease_duration": lease_duration,
        "data": data,
        "wrap_info": null,
        "warnings": warnings,
        "auth": auth,
        "mount_type": "",
    }))
    .into_response()
}

fn auth_block(token: &str, accessor: &str, ttl: u64) -> Value {
    json!({
        "client_token": token,
        "accessor": accessor,
        "policies": ["credbroker", "default"],
        "token_policies": ["credbroker", "default"],
        "metadata": { "role_name": "credbroker" },
        "lease_duration": ttl,
        "renewable": true,
        "entity_id": "8f3e6a4e-0000-4000-8000-000000000001",
        "token_type": "service",
        "orphan": true,
        "mfa_requirement": null,
        "num_uses": 0,
    })
}

/// A new token, as every login method returns it.
fn issue_token(s: &mut StandinState, now: Instant, metadata: Value) -> Response {
    s.logins += 1;
    let token = format!("hvs.{}", random_suffix());
    let accessor = random_suffix();
    s.tokens.insert(
        token.clone(),
        TokenEntry {
            expires: now + Duration::from_secs(s.token_ttl),
            max_expires: now + Duration::from_secs(s.token_max_ttl),
            accessor: accessor.clone(),
        },
    );
    let mut auth = auth_block(&token, &accessor, s.token_ttl);
    auth["metadata"] = metadata;
    envelope(Value::Null, "", 0, false, auth, None)
}

/// `POST auth/:mount/login` of the Kubernetes method (see the module docs).
fn kubernetes_login(s: &mut StandinState, now: Instant, mount: &str, body: &Value) -> Response {
    let role = body["role"].as_str().filter(|r| !r.is_empty()).map(str::to_owned);
    let jwt = body["jwt"].as_str().unwrap_or_default().to_owned();
    s.jwt_logins.push((mount.to_owned(), role.clone(), jwt.clone()));
    let config = &s.kubernetes_mounts[mount];
    let Some(role) = role else { return error(StatusCode::BAD_REQUEST, "missing role") };
    if jwt.is_empty() {
        return error(StatusCode::BAD_REQUEST, "missing jwt");
    }
    if role != config.role {
        return error(StatusCode::BAD_REQUEST, &format!("invalid role name \"{role}\""));
    }
    if jwt != config.accepted_jwt {
        return error(StatusCode::FORBIDDEN, "permission denied");
    }
    let metadata = json!({
        "role": role, "service_account_name": "credbroker", "service_account_namespace": "credbroker",
        "service_account_secret_name": "", "service_account_uid": "5f3e6a4e-0000-4000-8000-000000000002",
    });
    issue_token(s, now, metadata)
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..24].to_owned()
}

async fn dispatch(
    State(state): State<Arc<Mutex<StandinState>>>,
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = if body.is_empty() { json!({}) } else { serde_json::from_slice(&body).unwrap_or(json!({})) };
    let mut state = state.lock().unwrap();
    let s = &mut *state;
    if path == "sys/health" {
        return (
            StatusCode::OK,
            Json(json!({
                "initialized": true, "sealed": false, "standby": false, "performance_standby": false,
                "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
                "server_time_utc": OffsetDateTime::now_utc().unix_timestamp(), "version": "1.17.0",
                "cluster_name": "vault-cluster-standin", "cluster_id": "00000000-0000-4000-8000-000000000000",
            })),
        )
            .into_response();
    }
    let now = Instant::now();
    if path == "auth/approle/login" && method == Method::POST {
        if body["role_id"] != ROLE_ID || body["secret_id"] != SECRET_ID {
            return error(StatusCode::BAD_REQUEST, "invalid role or secret ID");
        }
        return issue_token(s, now, json!({ "role_name": "credbroker" }));
    }
    if let ["auth", mount, "login"] = path.split('/').collect::<Vec<_>>().as_slice() {
        if method == Method::POST && s.kubernetes_mounts.contains_key(*mount) {
            return kubernetes_login(s, now, mount, &body);
        }
    }

    // Everything below needs a live token.
    let token = headers.get("x-vault-token").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let live = s.tokens.get(&token).is_some_and(|entry| entry.expires > now);
    if !live {
        return error(StatusCode::FORBIDDEN, "permission denied");
    }

    let segments: Vec<&str> = path.split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST" | "PUT", ["auth", "token", "renew-self"]) => {
            let entry = s.tokens.get_mut(&token).unwrap();
            let ttl = s.token_ttl.min(entry.max_expires.saturating_duration_since(now).as_secs());
            entry.expires = now + Duration::from_secs(ttl);
            let accessor = entry.accessor.clone();
            envelope(Value::Null, "", 0, false, auth_block(&token, &accessor, ttl), None)
        }
        ("GET", ["auth", "token", "lookup-self"]) => {
            let entry = &s.tokens[&token];
            let ttl = entry.expires.saturating_duration_since(now).as_secs();
            let data = json!({
                "accessor": entry.accessor, "creation_time": 1_700_000_000u64, "creation_ttl": s.token_ttl,
                "display_name": "approle", "entity_id": "8f3e6a4e-0000-4000-8000-000000000001",
                "expire_time": null, "explicit_max_ttl": 0, "id": token, "identity_policies": null,
                "issue_time": "2023-11-14T22:13:20Z", "meta": { "role_name": "credbroker" }, "num_uses": 0,
                "orphan": true, "path": "auth/approle/login", "policies": ["credbroker", "default"],
                "renewable": true, "ttl": ttl, "type": "service",
            });
            envelope(data, "", 0, false, Value::Null, None)
        }
        ("GET", ["database", "creds", role_name]) => {
            let Some(role) = s.db_roles.get(*role_name).cloned() else {
                return error(StatusCode::BAD_REQUEST, &format!("unknown role: {role_name}"));
            };
            let lease_id = format!("database/creds/{role_name}/{}", random_suffix());
            let username = format!("V_APPROLE_{}_{}", role_name.to_uppercase().replace('-', "_"), &random_suffix()[..8].to_uppercase());
            let ttl = role.default_ttl.min(role.max_ttl);
            s.leases.insert(
                lease_id.clone(),
                LeaseEntry {
                    role: role_name.to_string(),
                    expires: now + Duration::from_secs(ttl),
                    max_expires: now + Duration::from_secs(role.max_ttl),
                    renewable: role.renewable,
                    revoked_at: None,
                    username: username.clone(),
                },
            );
            let data = if role.key_pair {
                json!({ "username": username, "rsa_private_key": super::rsa_pem(1) })
            } else {
                json!({ "username": username, "password": format!("A1a-{}", random_suffix()) })
            };
            envelope(data, &lease_id, ttl, role.renewable, Value::Null, None)
        }
        ("PUT" | "POST", ["sys", "leases", "renew"]) => {
            let lease_id = body["lease_id"].as_str().unwrap_or_default().to_owned();
            let increment = body["increment"].as_u64().unwrap_or(0);
            let Some(lease) = s.leases.get_mut(&lease_id).filter(|lease| lease.revoked_at.is_none() && lease.expires > now) else {
                return error(StatusCode::BAD_REQUEST, "lease not found");
            };
            if !lease.renewable {
                return error(StatusCode::BAD_REQUEST, "lease is not renewable");
            }
            let remaining_max = lease.max_expires.saturating_duration_since(now).as_secs();
            let ttl = increment.min(remaining_max);
            let warnings = (ttl < increment).then(|| {
                vec![format!("TTL of \"{increment}s\" exceeded the effective max_ttl of \"{remaining_max}s\"; TTL value is capped accordingly")]
            });
            lease.expires = now + Duration::from_secs(ttl);
            envelope(Value::Null, &lease_id, ttl, true, Value::Null, warnings)
        }
        ("PUT" | "POST", ["sys", "leases", "revoke"]) => {
            let lease_id = body["lease_id"].as_str().unwrap_or_default();
            if let Some(lease) = s.leases.get_mut(lease_id) {
                lease.revoked_at.get_or_insert_with(OffsetDateTime::now_utc);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no handler for route \"{path}\". route entry not found.")),
    }
}
