//! Looker API 4.0 sessions acting as a Looker user. The broker logs in with an admin API key
//! (`POST /api/4.0/login`, cached until shortly before it expires) and asks for a token that
//! runs as the role's user (`POST /api/4.0/login/{user_id}`, `associative=false` so activity
//! is attributed to that user). Looker fixes a token's lifetime at about an hour; when the job
//! ends sooner the broker ends the session at the job's deadline (`DELETE /api/4.0/logout`).
//!
//! Logging out takes the session token itself, so every session is handed to the durable
//! revocation schedule with the token as its revocation secret: the schedule keeps it only
//! AES-256-GCM sealed (`revocation::secret_encryption`), any replica ends the session at the deadline, a
//! restart does not lose it, and the security team can end a session on demand.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::{Param, ParamProblem, ParamSchema, ParamShape};
use crate::types::Ttl;
use crate::vault::secret_source::{self, SecretSource};

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "looker",
    required: &[],
    optional: &["user_id", "user_email", "associative"],
    ttl_note: "Looker API session: Looker fixes its lifetime at about 1 h (so max 1h); when the job deadline \
               is sooner the broker ends the session at the deadline with DELETE /api/4.0/logout",
    shapes: &[("user_id", ParamShape::Literal), ("user_email", ParamShape::Literal), ("associative", ParamShape::Literal)],
    check: Some(check_params),
    ..ParamSchema::PLAIN
};

/// Looker's documented access-token lifetime.
const LOOKER_SESSION_SECONDS: u64 = 3600;
/// The admin token is replaced this long before Looker would expire it.
const ADMIN_TOKEN_MARGIN: Duration = Duration::from_secs(60);
const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
/// Looker's reported expiry may lag ours by request latency; within this the session ends by itself.
const EXPIRY_SLACK_SECONDS: i64 = 2;

fn check_params(params: &std::collections::BTreeMap<String, Param>) -> Result<(), ParamProblem> {
    match (params.contains_key("user_id"), params.contains_key("user_email")) {
        (true, true) => return Err(ParamProblem::new("user_email", "set user_id or user_email, not both")),
        (false, false) => return Err(ParamProblem::new("user_id", "is required (or user_email, resolved to the id once)")),
        _ => {}
    }
    if let Some(value) = params.get("associative").and_then(Param::as_template) {
        if !matches!(value.as_str(), "true" | "false") {
            return Err(ParamProblem::new("associative", format!("{:?} must be \"true\" or \"false\"", value.as_str())));
        }
    }
    Ok(())
}

pub struct Looker {
    name: String,
    base_url: String,
    /// `{base_url}/api/4.0`
    api: String,
    http: reqwest::Client,
    client_id: Arc<dyn SecretSource>,
    client_secret: Arc<dyn SecretSource>,
    admin_token: tokio::sync::Mutex<Option<AdminToken>>,
    /// user_email → Looker user id, resolved once.
    user_ids: Mutex<HashMap<String, String>>,
}

struct AdminToken {
    token: SecretString,
    /// None when Looker reported no usable lifetime: used for one mint only.
    valid_until: Option<Instant>,
}

/// Looker's `AccessToken`.
#[derive(Deserialize)]
struct AccessToken {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["base_url", "admin_client_id", "admin_client_secret", "ca_file", "timeout_seconds"])?;
    let raw_url = table_string(table, context, "base_url")?
        .ok_or_else(|| context.error("base_url", "is required, e.g. \"https://company.looker.com\" (the API is under /api/4.0)"))?;
    let base_url = crate::config::parse_http_url(raw_url).map_err(|m| context.error("base_url", m))?.trim_end_matches('/').to_owned();
    if base_url.ends_with("/api/4.0") {
        return Err(context.error("base_url", "is the instance URL without /api/4.0 (the broker adds it)"));
    }
    let base_dir = context.config.resolve(Path::new(""));
    let source = |key: &str| -> Result<Arc<dyn SecretSource>, ConfigError> {
        let value = table.get(key).ok_or_else(|| {
            context.error(key, "is required: { file = \"...\" }, { env = \"...\" } or { vault_kv = \"path\", key = \"field\" }")
        })?;
        secret_source::parse(value, &context.config.source_name(), &format!("backends.{}.{key}", context.name), &base_dir, context.vault)
    };
    let client_id = source("admin_client_id")?;
    let client_secret = source("admin_client_secret")?;
    let timeout = match table.get("timeout_seconds") {
        None => DEFAULT_TIMEOUT_SECONDS,
        Some(toml::Value::Integer(seconds @ 1..=120)) => *seconds as u64,
        Some(_) => return Err(context.error("timeout_seconds", "must be a whole number of seconds from 1 to 120")),
    };
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(timeout)).redirect(reqwest::redirect::Policy::none());
    if let Some(ca_file) = table_string(table, context, "ca_file")? {
        let path = context.config.resolve(Path::new(ca_file));
        let pem = std::fs::read(&path).map_err(|e| context.error("ca_file", format!("cannot read {}: {e}", path.display())))?;
        let certificate = reqwest::Certificate::from_pem(&pem).map_err(|e| context.error("ca_file", format!("{} is not a PEM certificate: {e}", path.display())))?;
        http = http.add_root_certificate(certificate);
    }
    let http = http.build().map_err(|e| context.error("type", format!("cannot build the HTTP client: {e}")))?;
    Ok(Arc::new(Looker {
        name: context.name.to_string(),
        api: format!("{base_url}/api/4.0"),
        base_url,
        http,
        client_id,
        client_secret,
        admin_token: tokio::sync::Mutex::new(None),
        user_ids: Mutex::new(HashMap::new()),
    }))
}

/// Looker's error body is `{"message": ..., "documentation_url": ...}`.
async fn looker_message(response: reqwest::Response) -> String {
    let status = response.status();
    let message = response.json::<Value>().await.ok().and_then(|body| body["message"].as_str().map(str::to_owned));
    match message {
        Some(message) => format!("HTTP {status}: {message}"),
        None => format!("HTTP {status}"),
    }
}

impl Looker {
    fn failed(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Failed { backend: self.name.clone(), detail: detail.into() }
    }

    /// The cached admin token, logging in when there is none or it is about to expire.
    async fn admin_token(&self) -> Result<SecretString, BackendError> {
        let mut cached = self.admin_token.lock().await;
        if let Some(AdminToken { token, valid_until: Some(until) }) = cached.as_ref() {
            if Instant::now() + ADMIN_TOKEN_MARGIN < *until {
                return Ok(token.clone());
            }
        }
        let token = self.login().await?;
        *cached = Some(AdminToken { token: token.token.clone(), valid_until: token.valid_until });
        Ok(token.token)
    }

    fn forget_admin_token(&self) {
        if let Ok(mut cached) = self.admin_token.try_lock() {
            *cached = None;
        }
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name))]
    async fn login(&self) -> Result<AdminToken, BackendError> {
        let secret = |e: secret_source::SecretSourceError| self.failed(format!("admin API key: {e}"));
        let client_id = self.client_id.read().await.map_err(secret)?;
        let client_secret = self.client_secret.read().await.map_err(secret)?;
        // The spec asks for the credentials in a form body; query parameters are deprecated.
        let form = [("client_id", client_id.expose_secret()), ("client_secret", client_secret.expose_secret())];
        let response = self
            .http
            .post(format!("{}/login", self.api))
            .form(&form)
            .send()
            .await
            .map_err(|e| self.failed(format!("POST /api/4.0/login: {}", without_url(e))))?;
        if !response.status().is_success() {
            let status = response.status();
            let message = looker_message(response).await;
            if matches!(status, StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                // Looker answers a wrong key with 404; the key may have been rotated in Vault.
                self.client_id.invalidate();
                self.client_secret.invalidate();
            }
            return Err(self.failed(format!("admin login (POST /api/4.0/login) refused: {message}")));
        }
        let token: AccessToken = response.json().await.map_err(|e| self.failed(format!("admin login: unexpected answer: {e}")))?;
        let valid_until = token.expires_in.filter(|seconds| *seconds > 0).map(|seconds| Instant::now() + Duration::from_secs(seconds as u64));
        Ok(AdminToken { token: SecretString::from(token.access_token), valid_until })
    }

    /// `user_email` → id through `GET /api/4.0/users/credential/email/{email}`, once per email.
    async fn user_id_for_email(&self, email: &str, admin: &SecretString) -> Result<String, BackendError> {
        if let Some(id) = self.user_ids.lock().expect("user id cache lock").get(email) {
            return Ok(id.clone());
        }
        let mut url = url::Url::parse(&format!("{}/users/credential/email/", self.api)).map_err(|e| self.failed(e.to_string()))?;
        url.path_segments_mut().map_err(|_| self.failed("base_url cannot carry a path"))?.pop_if_empty().push(email);
        let response = self
            .http
            .get(url)
            .query(&[("fields", "id")])
            .header(reqwest::header::AUTHORIZATION, format!("token {}", admin.expose_secret()))
            .send()
            .await
            .map_err(|e| self.failed(format!("looking up {email}: {}", without_url(e))))?;
        if !response.status().is_success() {
            return Err(self.failed(format!("no Looker user with email {email:?}: {}", looker_message(response).await)));
        }
        let user: Value = response.json().await.map_err(|e| self.failed(format!("looking up {email}: unexpected answer: {e}")))?;
        let id = match &user["id"] {
            Value::String(id) if !id.is_empty() => id.clone(),
            Value::Number(id) => id.to_string(),
            _ => return Err(self.failed(format!("Looker's user record for {email:?} has no id"))),
        };
        self.user_ids.lock().expect("user id cache lock").insert(email.to_owned(), id.clone());
        Ok(id)
    }

    async fn login_user(&self, user_id: &str, associative: bool, admin: &SecretString) -> Result<Result<AccessToken, StatusCode>, BackendError> {
        let mut url = url::Url::parse(&format!("{}/login/", self.api)).map_err(|e| self.failed(e.to_string()))?;
        url.path_segments_mut().map_err(|_| self.failed("base_url cannot carry a path"))?.pop_if_empty().push(user_id);
        let response = self
            .http
            .post(url)
            .query(&[("associative", if associative { "true" } else { "false" })])
            .header(reqwest::header::AUTHORIZATION, format!("token {}", admin.expose_secret()))
            .send()
            .await
            .map_err(|e| self.failed(format!("POST /api/4.0/login/{user_id}: {}", without_url(e))))?;
        match response.status() {
            status if status.is_success() => {
                let token = response.json().await.map_err(|e| self.failed(format!("login as user {user_id}: unexpected answer: {e}")))?;
                Ok(Ok(token))
            }
            StatusCode::UNAUTHORIZED => Ok(Err(StatusCode::UNAUTHORIZED)),
            _ => Err(self.failed(format!("login as Looker user {user_id} refused: {}", looker_message(response).await))),
        }
    }
}

/// reqwest errors print the URL; ours carry no secrets, but keep messages short and uniform.
fn without_url(error: reqwest::Error) -> reqwest::Error {
    error.without_url()
}

#[async_trait]
impl Backend for Looker {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        "looker"
    }

    /// Looker decides a session's lifetime (about an hour); the broker can only shorten it.
    fn max_ttl(&self) -> Option<Ttl> {
        Some(Ttl::from_seconds(LOOKER_SESSION_SECONDS).expect("one hour is a valid TTL"))
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let param = |key: &str| request.params.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let associative = param("associative") == Some("true");
        let mut admin = self.admin_token().await?;
        let user_id = match (param("user_id"), param("user_email")) {
            (Some(id), _) => id.to_owned(),
            (None, Some(email)) => self.user_id_for_email(email, &admin).await?,
            (None, None) => return Err(self.failed("the role names neither user_id nor user_email")),
        };
        let mut answer = self.login_user(&user_id, associative, &admin).await?;
        if answer.is_err() {
            // Looker ended the admin session early (restart, admin logout): log in again once.
            self.forget_admin_token();
            admin = self.admin_token().await?;
            answer = self.login_user(&user_id, associative, &admin).await?;
        }
        let token = answer.map_err(|_| self.failed("Looker refused the admin session twice (HTTP 401)"))?;
        let now = OffsetDateTime::now_utc();
        let looker_expires_at = token.expires_in.filter(|s| *s > 0).map(|s| now + time::Duration::seconds(s));
        let secret = SecretString::from(token.access_token);

        // Looker ends the session itself if it would end by the deadline; otherwise we do.
        let ends_by_itself = looker_expires_at.is_some_and(|at| at <= request.expires_at + time::Duration::seconds(EXPIRY_SLACK_SECONDS));
        let expires_at = match looker_expires_at {
            Some(at) if at < request.expires_at => at,
            _ => request.expires_at,
        };
        let expires_at_text = crate::types::rfc3339(expires_at);
        let mut credential = Credential::new("access_token", secret.clone())
            .with_public("token_type", token.token_type.unwrap_or_else(|| "Bearer".into()))
            .with_public("expires_at", expires_at_text)
            .with_public("base_url", self.base_url.as_str())
            .with_public("user_id", user_id.as_str())
            .with_public("associative", associative)
            .with_public("authorization_header", "Authorization: token <access_token>")
            .with_public(
                "ttl_rule",
                if ends_by_itself {
                    "Looker session: Looker's own ~1 h lifetime ends it by the job deadline"
                } else {
                    "Looker session: Looker would keep it ~1 h; the broker ends it at expires_at (DELETE /api/4.0/logout)"
                },
            )
            .with_env("LOOKERSDK_BASE_URL", EnvValue::Public(self.base_url.clone()))
            .with_env("LOOKERSDK_API_VERSION", EnvValue::Public("4.0".into()))
            .with_env("LOOKERSDK_ACCESS_TOKEN", EnvValue::Secret("access_token"))
            .with_env("LOOKER_USER_ID", EnvValue::Public(user_id.clone()))
            .with_handle(user_id)
            .revocable_with(secret);
        if expires_at < request.expires_at {
            credential = credential.with_expires_at(expires_at);
        }
        if !ends_by_itself {
            credential = credential.outliving_grant();
        }
        Ok(credential)
    }

    fn can_revoke(&self) -> bool {
        true
    }

    fn revokes_with_secret(&self) -> bool {
        true
    }

    /// `DELETE /api/4.0/logout` with the session's own token. Looker answers 404 for a token it
    /// no longer knows (ended or expired): the session is gone, which is what was asked.
    #[tracing::instrument(skip(self, secret), fields(backend = %self.name))]
    async fn revoke(&self, user_id: &str, secret: Option<&SecretString>) -> Result<(), BackendError> {
        let token = secret.ok_or_else(|| {
            self.failed(format!(
                "the session token of Looker user {user_id} is no longer held, so the broker cannot end it; it ends at Looker's own expiry (about 1 h after issue)"
            ))
        })?;
        let response = self
            .http
            .delete(format!("{}/logout", self.api))
            .header(reqwest::header::AUTHORIZATION, format!("token {}", token.expose_secret()))
            .send()
            .await
            .map_err(|e| self.failed(format!("DELETE /api/4.0/logout: {}", without_url(e))))?;
        match response.status() {
            status if status.is_success() || status == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.failed(format!("logout of Looker user {user_id}'s session refused: {}", looker_message(response).await))),
        }
    }
}
