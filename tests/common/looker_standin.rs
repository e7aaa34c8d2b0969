//! A stateful Looker API 4.0 stand-in on 127.0.0.1:0, for flows that need real token values
//! (no Looker instance can run here; Prism checks request shapes against the official spec but
//! keeps no state, see PEERS.md). It follows the published API 4.0 spec
//! (tests/fixtures/looker-api-4.0.oas.json): paths under /api/4.0, `login` credentials in an
//! `application/x-www-form-urlencoded` body, `AccessToken {access_token, token_type,
//! expires_in, refresh_token}`, `Authorization: token <access_token>`, error bodies
//! `{message, documentation_url}`, `logout` answering 204 and invalidating the token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

pub const CLIENT_ID: &str = "admin-client-id";
pub const CLIENT_SECRET: &str = "admin-client-secret";
pub const ADMIN_USER_ID: &str = "1";

#[derive(Clone)]
pub struct LookerStandin {
    pub url: String,
    state: Arc<StandinState>,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: String,
    /// The `associative` query parameter of the `login/{user_id}` call that made it.
    pub associative: Option<String>,
}

struct StandinState {
    /// id → email
    users: Mutex<HashMap<String, String>>,
    tokens: Mutex<HashMap<String, Session>>,
    admin_expires_in: AtomicI64,
    logins: AtomicUsize,
    user_logins: AtomicUsize,
    email_lookups: AtomicUsize,
    logouts: Mutex<Vec<Session>>,
}

impl LookerStandin {
    pub async fn start() -> Self {
        let state = Arc::new(StandinState {
            users: Mutex::new(HashMap::from([(ADMIN_USER_ID.to_owned(), "admin@example.com".to_owned())])),
            tokens: Mutex::default(),
            admin_expires_in: AtomicI64::new(3600),
            logins: AtomicUsize::new(0),
            user_logins: AtomicUsize::new(0),
            email_lookups: AtomicUsize::new(0),
            logouts: Mutex::default(),
        });
        let router = Router::new()
            .route("/api/4.0/login", post(login))
            .route("/api/4.0/login/{user_id}", post(login_user))
            .route("/api/4.0/logout", delete(logout))
            .route("/api/4.0/user", get(me))
            .route("/api/4.0/users/credential/{credential_type}/{credential_id}", get(user_for_credential))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    pub fn add_user(&self, id: &str, email: &str) {
        self.state.users.lock().unwrap().insert(id.to_owned(), email.to_owned());
    }

    /// The `expires_in` of admin logins from now on.
    pub fn set_admin_expires_in(&self, seconds: i64) {
        self.state.admin_expires_in.store(seconds, Ordering::SeqCst);
    }

    /// Ends every admin session, as a Looker restart or an admin's logout would.
    pub fn drop_admin_sessions(&self) {
        self.state.tokens.lock().unwrap().retain(|_, session| session.user_id != ADMIN_USER_ID);
    }

    pub fn session(&self, token: &str) -> Option<Session> {
        self.state.tokens.lock().unwrap().get(token).cloned()
    }

    pub fn logins(&self) -> usize {
        self.state.logins.load(Ordering::SeqCst)
    }

    pub fn user_logins(&self) -> usize {
        self.state.user_logins.load(Ordering::SeqCst)
    }

    pub fn email_lookups(&self) -> usize {
        self.state.email_lookups.load(Ordering::SeqCst)
    }

    /// Sessions acting as `user_id` that Looker would still accept.
    pub fn live_sessions_of(&self, user_id: &str) -> usize {
        self.state.tokens.lock().unwrap().values().filter(|session| session.user_id == user_id).count()
    }

    pub fn logouts(&self) -> Vec<Session> {
        self.state.logouts.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message, "documentation_url": "https://cloud.google.com/looker/docs/" }))).into_response()
}

fn access_token(state: &StandinState, session: Session, expires_in: i64) -> Response {
    let token = uuid::Uuid::new_v4().simple().to_string();
    state.tokens.lock().unwrap().insert(token.clone(), session);
    Json(json!({ "access_token": token, "token_type": "Bearer", "expires_in": expires_in, "refresh_token": null })).into_response()
}

/// `Authorization: token <t>` (Looker also accepts `Bearer`).
fn caller(state: &StandinState, headers: &HeaderMap) -> Option<(String, Session)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("token") && !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let session = state.tokens.lock().unwrap().get(token.trim()).cloned()?;
    Some((token.trim().to_owned(), session))
}

async fn login(State(state): State<Arc<StandinState>>, headers: HeaderMap, body: String) -> Response {
    let form_type = headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return error(StatusCode::BAD_REQUEST, "Supported content types: application/x-www-form-urlencoded");
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET) {
        // Looker answers unknown API credentials with 404.
        return error(StatusCode::NOT_FOUND, "Not found");
    }
    state.logins.fetch_add(1, Ordering::SeqCst);
    let expires_in = state.admin_expires_in.load(Ordering::SeqCst);
    access_token(&state, Session { user_id: ADMIN_USER_ID.into(), associative: None }, expires_in)
}

async fn login_user(
    State(state): State<Arc<StandinState>>,
    Path(user_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some((_, session)) = caller(&state, &headers) else { return error(StatusCode::UNAUTHORIZED, "Requires authentication.") };
    if session.user_id != ADMIN_USER_ID {
        return error(StatusCode::FORBIDDEN, "Permission Denied");
    }
    if !state.users.lock().unwrap().contains_key(&user_id) {
        return error(StatusCode::NOT_FOUND, "Not found");
    }
    state.user_logins.fetch_add(1, Ordering::SeqCst);
    access_token(&state, Session { user_id, associative: query.get("associative").cloned() }, 3600)
}

async fn logout(State(state): State<Arc<StandinState>>, headers: HeaderMap) -> Response {
    let Some((token, session)) = caller(&state, &headers) else { return error(StatusCode::NOT_FOUND, "Not found") };
    state.tokens.lock().unwrap().remove(&token);
    state.logouts.lock().unwrap().push(session);
    StatusCode::NO_CONTENT.into_response()
}

async fn me(State(state): State<Arc<StandinState>>, headers: HeaderMap) -> Response {
    let Some((_, session)) = caller(&state, &headers) else { return error(StatusCode::UNAUTHORIZED, "Requires authentication.") };
    let email = state.users.lock().unwrap().get(&session.user_id).cloned();
    Json(json!({ "id": session.user_id, "email": email })).into_response()
}

async fn user_for_credential(
    State(state): State<Arc<StandinState>>,
    Path((credential_type, credential_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some((_, session)) = caller(&state, &headers) else { return error(StatusCode::UNAUTHORIZED, "Requires authentication.") };
    if session.user_id != ADMIN_USER_ID {
        return error(StatusCode::FORBIDDEN, "Permission Denied");
    }
    state.email_lookups.fetch_add(1, Ordering::SeqCst);
    if credential_type != "email" {
        return error(StatusCode::NOT_FOUND, "Not found");
    }
    let users = state.users.lock().unwrap();
    match users.iter().find(|(_, email)| email.eq_ignore_ascii_case(&credential_id)) {
        Some((id, email)) => Json(json!({ "id": id, "email": email })).into_response(),
        None => error(StatusCode::NOT_FOUND, "Not found"),
    }
}

/// The `[backends.looker]` table for the stand-in at `base_url`, its admin API key in files in `secrets`.
pub fn looker_tables(base_url: &str, secrets: &std::path::Path, client_secret: &str) -> String {
    std::fs::write(secrets.join("looker-client-id"), format!("{CLIENT_ID}\n")).unwrap();
    std::fs::write(secrets.join("looker-client-secret"), format!("{client_secret}\n")).unwrap();
    format!(
        r#"
[backends.looker]
type = "looker"
base_url = "{base_url}"
admin_client_id = {{ file = "{id}" }}
admin_client_secret = {{ file = "{secret}" }}
timeout_seconds = 5
"#,
        id = secrets.join("looker-client-id").display(),
        secret = secrets.join("looker-client-secret").display(),
    )
}

/// Top-level config lines: the AES-256 key that seals Looker session tokens in the
/// revocation schedule (written to `dir`), and a worker that looks for due revocations every second.
pub fn revocation_key_extra(dir: &std::path::Path) -> String {
    use base64::Engine;
    let path = dir.join("revocation.key");
    std::fs::write(&path, format!("{}\n", base64::engine::general_purpose::STANDARD.encode([9u8; 32]))).unwrap();
    format!("revocation_secret_key = {{ file = \"{}\" }}\nrevocation_poll_seconds = 1", path.display())
}
