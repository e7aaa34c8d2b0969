//! A STAND-IN for HashiCorp Vault, not Vault. No Vault server can run here (see
//! ../shared/PEERS.md), so this serves the slice of Vault's documented HTTP API the broker
//! uses, with Vault's field names, envelope (`request_id`, `lease_id`, `lease_duration`,
//! `renewable`, `data`, `wrap_info`, `warnings`, `auth`), error bodies (`{"errors": [...]}`) and
//! status codes (400 bad request, 403 permission denied, 404, 503 sealed). The broker talks to
//! it through its production `vaultrs` client. Each route names the Vault API page it follows:
//!
//! - GET  sys/health                 https://developer.hashicorp.com/vault/api-docs/system/health
//! - POST auth/approle/login         https://developer.hashicorp.com/vault/api-docs/auth/approle#login-with-approle
//! - POST auth/:mount/login (kubernetes) https://developer.hashicorp.com/vault/api-docs/auth/kubernetes#login
//!   (`role` and `jwt` both required; an unknown role is 400 `invalid role name`, a service-account
//!   token the TokenReview API rejects is 403 `permission denied`)
//! - POST auth/:mount/login (jwt)    https://developer.hashicorp.com/vault/api-docs/auth/jwt#jwt-login
//!   (`jwt` required, `role` optional falling back to the mount's `default_role`; an unknown role is
//!   400 `role "x" could not be found`, a token that does not validate is 400 `error validating token: ...`)
//! - POST auth/token/renew-self      https://developer.hashicorp.com/vault/api-docs/auth/token#renew-a-token-self
//! - GET  auth/token/lookup-self     https://developer.hashicorp.com/vault/api-docs/auth/token#lookup-a-token-self
//! - GET  database/creds/:name       https://developer.hashicorp.com/vault/api-docs/secret/databases#generate-credentials
//! - PUT  sys/leases/renew           https://developer.hashicorp.com/vault/api-docs/system/leases#renew-lease
//! - PUT  sys/leases/revoke          https://developer.hashicorp.com/vault/api-docs/system/leases#revoke-lease
//! - POST transit/sign/:name         https://developer.hashicorp.com/vault/api-docs/secret/transit#sign-data
//! - GET  transit/keys/:name         https://developer.hashicorp.com/vault/api-docs/secret/transit#read-key
//! - POST transit/encrypt/:name      https://developer.hashicorp.com/vault/api-docs/secret/transit#encrypt-data
//! - POST transit/decrypt/:name      https://developer.hashicorp.com/vault/api-docs/secret/transit#decrypt-data
//!   (`aes256-gcm96` keys: base64 `plaintext`, optional base64 `associated_data`; ciphertext
//!   `vault:v1:` + base64(nonce ‖ ciphertext ‖ tag); a ciphertext that does not open is 400)
//! - GET  secret/data/:path          https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2#read-secret-version
//!
//! Simplifications, each outside what the broker relies on: one token policy (a path-prefix
//! deny list stands in for ACL policies), transit keys are rsa-2048 or ecdsa-p256 (real
//! signatures: RSA PKCS#1 v1.5 / PSS, ECDSA P-256 marshalled as `asn1` (DER, Vault's default) or
//! `jws` (r‖s)), a Kubernetes or JWT login accepts exactly one token string per mount (where Vault
//! would ask the TokenReview API or check the JWT's signature and bound claims), and database
//! users are not created anywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Map, Value};
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
    pub sealed: bool,
    pub token_ttl: u64,
    pub token_max_ttl: u64,
    pub tokens: HashMap<String, TokenEntry>,
    pub logins: usize,
    pub renewals: usize,
    /// Paths (without /v1/) under these prefixes answer 403, as a Vault policy without them would.
    pub denied_prefixes: Vec<String>,
    pub db_roles: HashMap<String, DbRole>,
    pub leases: HashMap<String, LeaseEntry>,
    /// (lease_id, increment) of every sys/leases/renew call.
    pub lease_renewals: Vec<(String, u64)>,
    /// lease_id of every sys/leases/revoke call, repeats included.
    pub lease_revocations: Vec<String>,
    pub transit_keys: HashMap<String, Vec<TransitVersion>>,
    /// (key, key_version asked for) of every transit/sign call.
    pub sign_requests: Vec<(String, Option<u64>)>,
    pub kv: HashMap<String, (u64, Value)>,
    /// X-Vault-Namespace headers seen.
    pub namespaces: Vec<String>,
    /// Kubernetes and JWT auth mounts, by mount path (`kubernetes`, `jwt`, ...).
    pub jwt_mounts: HashMap<String, JwtMount>,
    /// (mount, role, jwt) of every login at a Kubernetes or JWT mount, accepted or not.
    pub jwt_logins: Vec<(String, Option<String>, String)>,
    /// `aes256-gcm96` transit keys (one version each).
    pub transit_aead_keys: HashMap<String, [u8; 32]>,
    /// (operation, key, body) of every transit/encrypt and transit/decrypt call.
    pub aead_requests: Vec<(String, String, Value)>,
}

/// A Kubernetes or JWT auth mount with one role.
pub struct JwtMount {
    /// `kubernetes` or `jwt`: which method's parameters and errors the mount follows.
    pub method: &'static str,
    pub role: String,
    /// JWT method only: the role used when a login names none.
    pub default_role: Option<String>,
    /// The one token this mount accepts now (a projected service-account token is replaced
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

pub struct TransitVersion {
    /// PKCS#8 PEM of an RSA key (rsa-2048) or a P-256 key (ecdsa-p256).
    pub private_pem: String,
    pub ecdsa: bool,
    pub created: OffsetDateTime,
}

impl VaultStandin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(StandinState {
            sealed: false,
            token_ttl: 3600,
            token_max_ttl: 7200,
            tokens: HashMap::new(),
            logins: 0,
            renewals: 0,
            denied_prefixes: Vec::new(),
            db_roles: HashMap::new(),
            leases: HashMap::new(),
            lease_renewals: Vec::new(),
            lease_revocations: Vec::new(),
            transit_keys: HashMap::new(),
            sign_requests: Vec::new(),
            kv: HashMap::new(),
            namespaces: Vec::new(),
            jwt_mounts: HashMap::new(),
            jwt_logins: Vec::new(),
            transit_aead_keys: HashMap::new(),
            aead_requests: Vec::new(),
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

    /// Creates the key or rotates it (adds a version), like `transit/keys/:name/rotate`.
    pub fn rotate_transit_key(&self, name: &str, private_pem: &str) {
        self.add_transit_version(name, private_pem, false);
    }

    /// As [`Self::rotate_transit_key`] for an `ecdsa-p256` key (PKCS#8 PEM of a P-256 key).
    pub fn rotate_transit_ecdsa_key(&self, name: &str, private_pem: &str) {
        self.add_transit_version(name, private_pem, true);
    }

    fn add_transit_version(&self, name: &str, private_pem: &str, ecdsa: bool) {
        self.with(|s| {
            s.transit_keys
                .entry(name.to_owned())
                .or_default()
                .push(TransitVersion { private_pem: private_pem.to_owned(), ecdsa, created: OffsetDateTime::now_utc() })
        });
    }

    /// Creates an `aes256-gcm96` transit key (`transit/keys/:name` with `type = aes256-gcm96`).
    pub fn create_transit_aead_key(&self, name: &str) {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        self.with(|s| s.transit_aead_keys.insert(name.to_owned(), key));
    }

    /// Enables a Kubernetes (`method = "kubernetes"`) or JWT (`"jwt"`) auth mount with one role,
    /// accepting `jwt`; calling it again replaces the accepted token (a rotation).
    pub fn set_jwt_mount(&self, mount: &str, method: &'static str, role: &str, jwt: &str) {
        self.with(|s| {
            s.jwt_mounts.insert(mount.to_owned(), JwtMount { method, role: role.to_owned(), default_role: None, accepted_jwt: jwt.to_owned() })
        });
    }

    pub fn put_kv(&self, path: &str, data: Value) {
        self.with(|s| {
            let version = s.kv.get(path).map(|(version, _)| version + 1).unwrap_or(1);
            s.kv.insert(path.to_owned(), (version, data));
        });
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

/// `POST auth/:mount/login` of the Kubernetes and JWT methods (see the module docs for the
/// documented parameters and errors each follows).
fn jwt_login(s: &mut StandinState, now: Instant, mount: &str, body: &Value) -> Response {
    let role = body["role"].as_str().filter(|r| !r.is_empty()).map(str::to_owned);
    let jwt = body["jwt"].as_str().unwrap_or_default().to_owned();
    s.jwt_logins.push((mount.to_owned(), role.clone(), jwt.clone()));
    let config = &s.jwt_mounts[mount];
    let metadata = if config.method == "kubernetes" {
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
        json!({
            "role": role, "service_account_name": "credbroker", "service_account_namespace": "credbroker",
            "service_account_secret_name": "", "service_account_uid": "5f3e6a4e-0000-4000-8000-000000000002",
        })
    } else {
        if jwt.is_empty() {
            return error(StatusCode::BAD_REQUEST, "missing token");
        }
        let Some(role) = role.or_else(|| config.default_role.clone()) else {
            return error(StatusCode::BAD_REQUEST, "missing role");
        };
        if role != config.role {
            return error(StatusCode::BAD_REQUEST, &format!("role \"{role}\" could not be found"));
        }
        if jwt != config.accepted_jwt {
            return error(StatusCode::BAD_REQUEST, "error validating token: failed to verify id token signature");
        }
        json!({ "role": role })
    };
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
    if let Some(namespace) = headers.get("x-vault-namespace").and_then(|v| v.to_str().ok()) {
        s.namespaces.push(namespace.to_owned());
    }
    if path == "sys/health" {
        let status = if s.sealed { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
        return (
            status,
            Json(json!({
                "initialized": true, "sealed": s.sealed, "standby": false, "performance_standby": false,
                "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
                "server_time_utc": OffsetDateTime::now_utc().unix_timestamp(), "version": "1.17.0",
                "cluster_name": "vault-cluster-standin", "cluster_id": "00000000-0000-4000-8000-000000000000",
            })),
        )
            .into_response();
    }
    if s.sealed {
        return error(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed");
    }
    let now = Instant::now();
    if path == "auth/approle/login" && method == Method::POST {
        if body["role_id"] != ROLE_ID || body["secret_id"] != SECRET_ID {
            return error(StatusCode::BAD_REQUEST, "invalid role or secret ID");
        }
        return issue_token(s, now, json!({ "role_name": "credbroker" }));
    }
    if let ["auth", mount, "login"] = path.split('/').collect::<Vec<_>>().as_slice() {
        if method == Method::POST && s.jwt_mounts.contains_key(*mount) {
            return jwt_login(s, now, mount, &body);
        }
    }

    // Everything below needs a live token.
    let token = headers.get("x-vault-token").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let live = s.tokens.get(&token).is_some_and(|entry| entry.expires > now);
    if !live || s.denied_prefixes.iter().any(|prefix| path.starts_with(prefix.as_str())) {
        return error(StatusCode::FORBIDDEN, "permission denied");
    }

    let segments: Vec<&str> = path.split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST" | "PUT", ["auth", "token", "renew-self"]) => {
            s.renewals += 1;
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
            s.lease_renewals.push((lease_id.clone(), increment));
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
            s.lease_revocations.push(lease_id.to_owned());
            if let Some(lease) = s.leases.get_mut(lease_id) {
                lease.revoked_at.get_or_insert_with(OffsetDateTime::now_utc);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        ("GET", ["transit", "keys", name]) => {
            let Some(versions) = s.transit_keys.get(*name) else { return error(StatusCode::NOT_FOUND, "") };
            let keys: Map<String, Value> = versions
                .iter()
                .enumerate()
                .map(|(index, version)| {
                    let public = public_pem(version);
                    let created = version.created.format(&time::format_description::well_known::Rfc3339).unwrap();
                    let name = if version.ecdsa { "P-256" } else { "rsa-2048" };
                    ((index + 1).to_string(), json!({ "creation_time": created, "name": name, "public_key": public }))
                })
                .collect();
            let key_type = if versions.last().is_some_and(|v| v.ecdsa) { "ecdsa-p256" } else { "rsa-2048" };
            let data = json!({
                "allow_plaintext_backup": false, "auto_rotate_period": 0, "deletion_allowed": false, "derived": false,
                "exportable": false, "imported_key": false, "keys": keys, "latest_version": versions.len(),
                "min_available_version": 0, "min_decryption_version": 1, "min_encryption_version": 0, "name": name,
                "supports_decryption": true, "supports_derivation": false, "supports_encryption": true,
                "supports_signing": true, "type": key_type,
            });
            envelope(data, "", 0, false, Value::Null, None)
        }
        ("POST" | "PUT", ["transit", "sign", name]) => {
            let requested = body["key_version"].as_u64();
            s.sign_requests.push((name.to_string(), requested));
            let Some(versions) = s.transit_keys.get(*name) else { return error(StatusCode::BAD_REQUEST, "signing key not found") };
            let version = requested.filter(|v| *v != 0).unwrap_or(versions.len() as u64);
            let Some(key) = versions.get((version as usize).wrapping_sub(1)) else {
                return error(StatusCode::BAD_REQUEST, "requested version for signing does not exist");
            };
            if body["hash_algorithm"].as_str().is_some_and(|h| h != "sha2-256") {
                return error(StatusCode::BAD_REQUEST, "stand-in signs with sha2-256 only");
            }
            let Some(input) = body["input"].as_str().and_then(|i| STANDARD.decode(i).ok()) else {
                return error(StatusCode::BAD_REQUEST, "unable to decode input as base64");
            };
            if key.ecdsa {
                return ecdsa_sign(key, &input, version, body["marshaling_algorithm"].as_str().unwrap_or("asn1"));
            }
            // Vault's default RSA signature algorithm is PSS: a client that forgets to ask for
            // pkcs1v15 gets a signature RS256 verifiers reject, exactly as from Vault.
            let algorithm = match body["signature_algorithm"].as_str().unwrap_or("pss") {
                "pkcs1v15" => jsonwebtoken::Algorithm::RS256,
                "pss" => jsonwebtoken::Algorithm::PS256,
                other => return error(StatusCode::BAD_REQUEST, &format!("unsupported rsa signature algorithm {other}")),
            };
            let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap();
            let signature = jsonwebtoken::crypto::sign(&input, &encoding, algorithm).unwrap();
            let raw = URL_SAFE_NO_PAD.decode(signature).unwrap();
            let data = json!({ "signature": format!("vault:v{version}:{}", STANDARD.encode(raw)), "key_version": version });
            envelope(data, "", 0, false, Value::Null, None)
        }
        ("POST" | "PUT", ["transit", operation @ ("encrypt" | "decrypt"), name]) => {
            s.aead_requests.push((operation.to_string(), name.to_string(), body.clone()));
            let Some(key) = s.transit_aead_keys.get(*name) else { return error(StatusCode::BAD_REQUEST, "encryption key not found") };
            transit_aead(key, operation, &body)
        }
        ("GET", ["secret", "data", rest @ ..]) => {
            let kv_path = rest.join("/");
            let Some((version, data)) = s.kv.get(&kv_path) else { return error(StatusCode::NOT_FOUND, "") };
            let data = json!({
                "data": data,
                "metadata": { "created_time": "2024-01-01T00:00:00.000000Z", "custom_metadata": null,
                              "deletion_time": "", "destroyed": false, "version": version },
            });
            envelope(data, "", 0, false, Value::Null, None)
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no handler for route \"{path}\". route entry not found.")),
    }
}

/// `transit/encrypt` and `transit/decrypt` with a real AES-256-GCM key.
fn transit_aead(key: &[u8; 32], operation: &str, body: &Value) -> Response {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let cipher = aes_gcm::Aes256Gcm::new(&(*key).into());
    let decode = |field: &str| match body[field].as_str() {
        None => Ok(Vec::new()),
        Some(text) => STANDARD.decode(text).map_err(|_| format!("failed to base64-decode {field}")),
    };
    let associated_data = match decode("associated_data") {
        Ok(data) => data,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    if operation == "encrypt" {
        let plaintext = match decode("plaintext") {
            Ok(data) => data,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let sealed = cipher.encrypt(&nonce.into(), Payload { msg: &plaintext, aad: &associated_data }).unwrap();
        let ciphertext = format!("vault:v1:{}", STANDARD.encode([nonce.as_slice(), &sealed].concat()));
        return envelope(json!({ "ciphertext": ciphertext, "key_version": 1 }), "", 0, false, Value::Null, None);
    }
    let Some(raw) = body["ciphertext"].as_str().and_then(|c| c.strip_prefix("vault:v1:")).and_then(|c| STANDARD.decode(c).ok()).filter(|raw| raw.len() > 12) else {
        return error(StatusCode::BAD_REQUEST, "invalid ciphertext: no prefix");
    };
    let nonce: [u8; 12] = raw[..12].try_into().unwrap();
    match cipher.decrypt(&nonce.into(), Payload { msg: &raw[12..], aad: &associated_data }) {
        Ok(plaintext) => envelope(json!({ "plaintext": STANDARD.encode(plaintext) }), "", 0, false, Value::Null, None),
        Err(_) => error(StatusCode::BAD_REQUEST, "cipher: message authentication failed"),
    }
}

fn public_pem(version: &TransitVersion) -> String {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
    if version.ecdsa {
        let key = p256::SecretKey::from_pkcs8_pem(&version.private_pem).unwrap();
        return key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    }
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&version.private_pem).unwrap();
    key.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()
}

/// A real ECDSA P-256 / SHA-256 signature over `input`, marshalled as Vault does: `asn1`
/// (its default: a DER `ECDSA-Sig-Value`, standard base64) or `jws` (r‖s, base64url without
/// padding, what a JWT carries).
fn ecdsa_sign(key: &TransitVersion, input: &[u8], version: u64, marshaling: &str) -> Response {
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.private_pem.as_bytes()).unwrap();
    let jws = jsonwebtoken::crypto::sign(input, &encoding, jsonwebtoken::Algorithm::ES256).unwrap();
    let encoded = match marshaling {
        "jws" => jws,
        "asn1" => STANDARD.encode(der_signature(&URL_SAFE_NO_PAD.decode(&jws).unwrap())),
        other => return error(StatusCode::BAD_REQUEST, &format!("unsupported marshaling algorithm {other}")),
    };
    envelope(json!({ "signature": format!("vault:v{version}:{encoded}"), "key_version": version }), "", 0, false, Value::Null, None)
}

/// r‖s (32 bytes each) as DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn der_signature(raw: &[u8]) -> Vec<u8> {
    let integer = |bytes: &[u8]| {
        let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
        let mut value = if trimmed.first().is_none_or(|b| b & 0x80 != 0) { vec![0] } else { vec![] };
        value.extend(trimmed);
        let mut encoded = vec![0x02, value.len() as u8];
        encoded.extend(value);
        encoded
    };
    let mut body = integer(&raw[..32]);
    body.extend(integer(&raw[32..]));
    let mut der = vec![0x30, body.len() as u8];
    der.extend(body);
    der
}
