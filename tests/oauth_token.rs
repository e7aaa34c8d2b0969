//! `POST /oauth/token` end to end (real Postgres, a real OIDC issuer over HTTP, the real broker):
//! the three grants, every RFC error of the contract, one audit row per request with
//! `endpoint = oauth_token`, and the use count shared with `POST /v1/credentials`.

mod common;

use common::{rsa_pem, temp_dir, TestApp, POLICIES};
use credbroker::types::sha256_hex;
use serde_json::{json, Value};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// The shared roles plus one on a backend whose credential is more than a bearer token.
async fn spawn() -> (TestApp, common::TempDir) {
    let keys = temp_dir();
    let key = keys.0.join("snowflake.pem");
    std::fs::write(&key, rsa_pem(1)).unwrap();
    let tables = format!(
        "[backends.snowflake]\ntype = \"snowflake_keypair\"\naccount = \"myorg.analytics\"\n\
         [backends.snowflake.users.CI_LOADER]\nprivate_key = {{ file = \"{}\" }}\n",
        key.display()
    );
    let policies = format!(
        "{POLICIES}\n[[role]]\nname = \"loader\"\nbackend = \"snowflake\"\nissuer = \"gitlab\"\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n\
         user = \"CI_LOADER\"\n[role.claims]\njob_project_path = \"platform/orders\"\n"
    );
    (TestApp::spawn_full("", &tables, &policies, None).await, keys)
}

async fn token_request(app: &TestApp, form: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = app.client.post(format!("{}/oauth/token", app.url)).form(form).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

fn exchange_form<'a>(token: &'a str, role: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![("grant_type", TOKEN_EXCHANGE), ("subject_token", token), ("subject_token_type", ID_TOKEN_TYPE), ("scope", role)]
}

fn jwt_bearer_form<'a>(token: &'a str, role: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![("grant_type", JWT_BEARER), ("assertion", token), ("scope", role)]
}

fn client_credentials_form<'a>(token: &'a str, role: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![("grant_type", "client_credentials"), ("client_assertion_type", CLIENT_ASSERTION_TYPE), ("client_assertion", token), ("scope", role)]
}

/// Every row of a token-endpoint request, oldest first.
async fn oauth_rows(app: &TestApp) -> Vec<Value> {
    sqlx::query_scalar("select to_jsonb(a) from audit_events a where endpoint = 'oauth_token' order by occurred_at")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// A refusal: the RFC 6749 body, no-store, and its one audit row with credbroker's own code.
async fn assert_refused(app: &TestApp, form: &[(&str, &str)], status: u16, error: &str, code: &str) -> Value {
    let (got, headers, body) = token_request(app, form).await;
    assert_eq!((got, body["error"].as_str()), (status, Some(error)), "{body}");
    assert!(!body["error_description"].as_str().unwrap_or_default().is_empty(), "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(
        (row["decision"].as_str(), row["code"].as_str(), row["endpoint"].as_str()),
        (Some("denied"), Some(code), Some("oauth_token")),
        "{row}"
    );
    body
}

/// A success: RFC 6749 section 5.1's body, and an issued row like any exchange's.
async fn assert_issued(app: &TestApp, form: &[(&str, &str)], job_token: &str, role: &str) -> String {
    let (status, headers, body) = token_request(app, form).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], role, "the scope echoes the role");
    assert_eq!(body["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    let access_token = body["access_token"].as_str().unwrap().to_owned();
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["endpoint"].as_str(), row["role"].as_str()), (Some("issued"), Some("oauth_token"), Some(role)));
    assert_eq!(row["credential_sha256"], sha256_hex(access_token.as_bytes()));
    assert_eq!(row["job_token_sha256"], sha256_hex(job_token.as_bytes()));
    assert_eq!(body["expires_in"], row["granted_ttl_seconds"]);
    access_token
}

async fn assert_kip768_valid(app: &TestApp, token: String) {
    let (jwks_url, issuer) = (format!("{}/.well-known/jwks.json", app.url), app.public_url.clone());
    let output = tokio::task::spawn_blocking(move || common::kip768_validate(&jwks_url, "kafka-test", &issuer, &token)).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdict["principal"], "ci:platform/orders");
}

#[tokio::test]
async fn token_exchange_issues_a_kafka_token_recorded_as_an_oauth_token_request() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let token = assert_issued(&app, &exchange_form(&job_token, "orders-producer"), &job_token, "orders-producer").await;
    assert_kip768_valid(&app, token).await;
    // The other door records its own name.
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.audit_row(body["issuance_id"].as_str().unwrap()).await["endpoint"], "credentials");
}

#[tokio::test]
async fn token_exchange_takes_the_role_from_audience_or_resource_and_scope_wins() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token_with(json!({}));
    let mut form = vec![("grant_type", TOKEN_EXCHANGE), ("subject_token", job_token.as_str()), ("subject_token_type", JWT_TYPE)];
    form.push(("audience", "orders-producer"));
    assert_issued(&app, &form, &job_token, "orders-producer").await;
    let job_token = app.issuer.token();
    let form = vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", job_token.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("resource", "orders-producer"),
    ];
    assert_issued(&app, &form, &job_token, "orders-producer").await;
    let job_token = app.issuer.token();
    let mut form = exchange_form(&job_token, "orders-multi");
    form.extend([("audience", "no-such-role"), ("resource", "no-such-role")]);
    assert_issued(&app, &form, &job_token, "orders-multi").await;
}

#[tokio::test]
async fn jwt_bearer_grant_issues_a_kafka_token() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let token = assert_issued(&app, &jwt_bearer_form(&job_token, "orders-producer"), &job_token, "orders-producer").await;
    assert_kip768_valid(&app, token).await;
}

#[tokio::test]
async fn client_credentials_with_the_job_token_as_client_assertion_issues_a_kafka_token() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let token = assert_issued(&app, &client_credentials_form(&job_token, "orders-producer"), &job_token, "orders-producer").await;
    assert_kip768_valid(&app, token).await;
}

#[tokio::test]
async fn expires_in_never_passes_the_job_deadline() {
    let (app, _keys) = spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let job_token = app.issuer.token_with(json!({"exp": now + 120}));
    let (status, _, body) = token_request(&app, &jwt_bearer_form(&job_token, "orders-producer")).await;
    assert_eq!(status, 200, "{body}");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((115..=120).contains(&expires_in), "capped at the deadline, got {expires_in}");
}

/// The role's `max_uses_per_token` (3 for orders-multi) counts every door and every grant.
#[tokio::test]
async fn the_grants_share_max_uses_per_token_with_the_credentials_endpoint() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    assert_eq!(app.exchange(&job_token, json!({"role": "orders-multi"})).await.0, 200);
    assert_issued(&app, &exchange_form(&job_token, "orders-multi"), &job_token, "orders-multi").await;
    assert_issued(&app, &jwt_bearer_form(&job_token, "orders-multi"), &job_token, "orders-multi").await;
    // The fourth use is a replay, worded per grant.
    assert_refused(&app, &client_credentials_form(&job_token, "orders-multi"), 401, "invalid_client", "token_replayed").await;
    assert_refused(&app, &jwt_bearer_form(&job_token, "orders-multi"), 400, "invalid_grant", "token_replayed").await;
    assert_refused(&app, &exchange_form(&job_token, "orders-multi"), 400, "invalid_request", "token_replayed").await;
    let (status, _, body) = app.exchange(&job_token, json!({"role": "orders-multi"})).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("token_replayed")));
}

#[tokio::test]
async fn a_bad_expired_or_replayed_subject_token_is_invalid_request() {
    let (app, _keys) = spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = app.issuer.token_with(json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}));
    assert_refused(&app, &exchange_form(&expired, "orders-producer"), 400, "invalid_request", "invalid_token").await;
    let forged = app.issuer.key(1).sign(&app.issuer.claims()).unwrap();
    assert_refused(&app, &exchange_form(&forged, "orders-producer"), 400, "invalid_request", "invalid_token").await;
    let job_token = app.issuer.token();
    assert_issued(&app, &exchange_form(&job_token, "orders-producer"), &job_token, "orders-producer").await;
    assert_refused(&app, &exchange_form(&job_token, "orders-producer"), 400, "invalid_request", "token_replayed").await;
}

#[tokio::test]
async fn a_bad_expired_or_replayed_assertion_is_invalid_grant() {
    let (app, _keys) = spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = app.issuer.token_with(json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}));
    assert_refused(&app, &jwt_bearer_form(&expired, "orders-producer"), 400, "invalid_grant", "invalid_token").await;
    let other_audience = app.issuer.token_with(json!({"aud": "someone-else"}));
    assert_refused(&app, &jwt_bearer_form(&other_audience, "orders-producer"), 400, "invalid_grant", "invalid_token").await;
    let job_token = app.issuer.token();
    assert_issued(&app, &jwt_bearer_form(&job_token, "orders-producer"), &job_token, "orders-producer").await;
    assert_refused(&app, &jwt_bearer_form(&job_token, "orders-producer"), 400, "invalid_grant", "token_replayed").await;
}

#[tokio::test]
async fn a_bad_client_assertion_is_invalid_client_with_401() {
    let (app, _keys) = spawn().await;
    let forged = app.issuer.key(1).sign(&app.issuer.claims()).unwrap();
    assert_refused(&app, &client_credentials_form(&forged, "orders-producer"), 401, "invalid_client", "invalid_token").await;
    // A client secret instead of an assertion is refused before anything is verified.
    let form = [("grant_type", "client_credentials"), ("client_id", "job"), ("client_secret", "s"), ("scope", "orders-producer")];
    assert_refused(&app, &form, 401, "invalid_client", "invalid_request").await;
    // The same with the secret in HTTP Basic: the 401 names the scheme that failed.
    let response = app
        .client
        .post(format!("{}/oauth/token", app.url))
        .basic_auth("job", Some("s"))
        .form(&[("grant_type", "client_credentials"), ("scope", "orders-producer")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Basic realm=\"credbroker\"");
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "invalid_client");
    let job_token = app.issuer.token();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", "urn:example:other"),
        ("client_assertion", &job_token),
        ("scope", "orders-producer"),
    ];
    assert_refused(&app, &form, 401, "invalid_client", "invalid_request").await;
}

#[tokio::test]
async fn an_unknown_or_refused_role_is_invalid_scope() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let unknown = assert_refused(&app, &jwt_bearer_form(&job_token, "no-such-role"), 400, "invalid_scope", "access_denied").await;
    let stranger = app.issuer.token_with(json!({"job_project_path": "other/project"}));
    let refused = assert_refused(&app, &jwt_bearer_form(&stranger, "orders-producer"), 400, "invalid_scope", "access_denied").await;
    let wording = |body: &Value| body["error_description"].as_str().unwrap().replace("no-such-role", "R").replace("orders-producer", "R");
    assert_eq!(wording(&unknown), wording(&refused), "unknown and refused roles read alike");
    // Two roles in one scope: which one is meant cannot be guessed.
    assert_refused(&app, &jwt_bearer_form(&job_token, "orders-producer orders-multi"), 400, "invalid_scope", "invalid_request").await;
    assert_refused(&app, &[("grant_type", JWT_BEARER), ("assertion", &job_token)], 400, "invalid_scope", "invalid_request").await;
}

#[tokio::test]
async fn a_role_refused_through_audience_or_resource_is_invalid_target() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    for field in ["audience", "resource"] {
        let form =
            [("grant_type", TOKEN_EXCHANGE), ("subject_token", job_token.as_str()), ("subject_token_type", ID_TOKEN_TYPE), (field, "no-such-role")];
        assert_refused(&app, &form, 400, "invalid_target", "access_denied").await;
    }
}

#[tokio::test]
async fn a_role_whose_credential_is_not_one_bearer_token_is_invalid_scope_saying_why() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let body = assert_refused(&app, &jwt_bearer_form(&job_token, "loader"), 400, "invalid_scope", "access_denied").await;
    let description = body["error_description"].as_str().unwrap();
    assert!(description.contains("snowflake_keypair") && description.contains("POST /v1/credentials"), "{description}");
    // Nothing was spent: the same token still gets the credential through the other door.
    let (status, _, body) = app.exchange(&job_token, json!({"role": "loader"})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_unknown_grant_is_unsupported_grant_type() {
    let (app, _keys) = spawn().await;
    let form = [("grant_type", "password"), ("username", "u"), ("password", "p"), ("scope", "orders-producer")];
    assert_refused(&app, &form, 400, "unsupported_grant_type", "invalid_request").await;
}

#[tokio::test]
async fn only_form_encoded_requests_are_read() {
    let (app, _keys) = spawn().await;
    let job_token = app.issuer.token();
    let response = app
        .client
        .post(format!("{}/oauth/token", app.url))
        .json(&json!({"grant_type": JWT_BEARER, "assertion": job_token, "scope": "orders-producer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("application/x-www-form-urlencoded"), "{body}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["code"].as_str(), row["endpoint"].as_str()), (Some("invalid_request"), Some("oauth_token")));
    // A token exchange that names an unusable subject token type.
    let form = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", job_token.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:saml2"),
        ("scope", "orders-producer"),
    ];
    assert_refused(&app, &form, 400, "invalid_request", "invalid_request").await;
    assert_eq!(oauth_rows(&app).await.len(), 2, "one row per request");
}

#[tokio::test]
async fn discovery_advertises_the_token_endpoint_and_its_grants() {
    let (app, _keys) = spawn().await;
    let discovery: Value = reqwest::get(format!("{}/.well-known/openid-configuration", app.url)).await.unwrap().json().await.unwrap();
    assert_eq!(discovery["token_endpoint"], format!("{}/oauth/token", app.public_url));
    assert_eq!(discovery["grant_types_supported"], json!([TOKEN_EXCHANGE, JWT_BEARER, "client_credentials"]));
}

/// What the recording proxy saw: the status and body of each token response.
type Fetches = std::sync::Arc<std::sync::Mutex<Vec<(u16, Value)>>>;

/// Passes each request on to the broker's token endpoint unchanged and keeps the answer, so the
/// test can validate every token the client got (the broker stores only their SHA-256).
async fn recording_proxy(token_endpoint: String) -> (String, Fetches) {
    use axum::http::header::CONTENT_TYPE;
    let fetches: Fetches = Default::default();
    let seen = fetches.clone();
    let forward = move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
        let (seen, token_endpoint) = (seen.clone(), token_endpoint.clone());
        async move {
            let mut request = reqwest::Client::new().post(&token_endpoint).body(body);
            if let Some(content_type) = headers.get(CONTENT_TYPE) {
                request = request.header(CONTENT_TYPE, content_type.as_bytes());
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            seen.lock().unwrap().push((status, body.clone()));
            (axum::http::StatusCode::from_u16(status).unwrap(), axum::Json(body))
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/oauth/token", axum::routing::post(forward));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, fetches)
}

/// The real librdkafka (confluent-kafka) fetches its first token and refreshes it by itself,
/// each time presenting the same job token; every fetch is one issued row, and every token
/// passes Kafka's KIP-768 checks. tansu is there to be connected to; it cannot check
/// OAUTHBEARER, so whether the SASL login succeeds is not asserted.
#[tokio::test]
async fn confluent_kafka_fetches_and_refreshes_its_own_tokens() {
    let refreshing = "\n[[role]]\nname = \"refreshing\"\nbackend = \"kafka\"\nissuer = \"gitlab\"\ndefault_ttl = \"5s\"\nmax_ttl = \"1h\"\n\
                      max_uses_per_token = 20\nprincipal = \"ci:{job_project_path}\"\n[role.claims]\njob_project_path = \"platform/orders\"\n";
    let app = TestApp::spawn_full("", "", &format!("{POLICIES}{refreshing}"), None).await;
    let dir = temp_dir();
    let tansu = common::tansu::Tansu::start(&dir.0).await;
    let job_token = app.issuer.token();
    let deadline = app.issuer.claims()["exp"].as_i64().unwrap();
    let assertion = dir.0.join("job-token.jwt");
    std::fs::write(&assertion, &job_token).unwrap();
    let (token_url, fetches) = recording_proxy(format!("{}/oauth/token", app.url)).await;

    let mut client = std::process::Command::new("python3")
        .arg(common::repo_path("tests/kafka_oidc_client.py"))
        .args([&tansu.bootstrap(), &token_url, &assertion.display().to_string(), "refreshing", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("client.log")).unwrap())
        .spawn()
        .expect("python3 with confluent-kafka (scripts/test.sh installs it)");
    let started = std::time::Instant::now();
    while fetches.lock().unwrap().len() < 3 {
        if let Some(status) = client.try_wait().unwrap() {
            panic!("the Kafka client exited with {status}: {}", std::fs::read_to_string(dir.0.join("client.log")).unwrap_or_default());
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(40), "three fetches within 40 s: {:?}", fetches.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let fetches = fetches.lock().unwrap().clone();
    let rows = oauth_rows(&app).await;
    assert_eq!(rows.len(), fetches.len(), "one row per fetch");
    for ((status, body), row) in fetches.iter().zip(&rows) {
        assert_eq!(*status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_owned();
        assert_eq!((row["decision"].as_str(), row["role"].as_str()), (Some("issued"), Some("refreshing")));
        assert_eq!(row["credential_sha256"], sha256_hex(token.as_bytes()));
        assert_eq!(row["job_token_sha256"], sha256_hex(job_token.as_bytes()), "each refresh presents the same job token");
        assert!(body["expires_in"].as_i64().unwrap() <= 5);
        let claims: Value = {
            use base64::Engine;
            let payload = token.split('.').nth(1).unwrap();
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
        };
        assert!(claims["exp"].as_i64().unwrap() <= deadline, "never past the job's deadline");
        assert_kip768_valid(&app, token).await;
    }
    let distinct: std::collections::HashSet<_> = rows.iter().map(|row| row["credential_sha256"].to_string()).collect();
    assert_eq!(distinct.len(), rows.len(), "every refresh is a new token");
}
