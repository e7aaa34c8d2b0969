//! The exchange path end to end: real Postgres, a real OIDC issuer over HTTP, the real broker.

mod common;

use base64::Engine;
use common::{PostgresProxy, TestApp};
use credbroker::types::sha256_hex;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{json, Value};

fn role(name: &str) -> Value {
    json!({ "role": name })
}

#[tokio::test]
async fn job_token_becomes_a_kafka_credential_recorded_before_delivery() {
    let app = TestApp::spawn().await;
    let token = app.issuer.token();
    let (status, headers, body) = app.exchange(&token, json!({"role": "orders-producer", "ttl_seconds": 600})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["role"], "orders-producer");
    assert_eq!(body["target"], "kafka");
    assert_eq!(body["backend"], "kafka");
    assert_eq!(body["ttl_seconds"], 600);
    let credential = &body["credential"];
    assert_eq!(credential["principal"], "ci:platform/orders");
    assert_eq!(credential["token_type"], "Bearer");
    assert_eq!(credential["mechanism"], "OAUTHBEARER");
    let kafka_token = credential["token"].as_str().unwrap();
    assert_eq!(body["env"]["KAFKA_OAUTHBEARER_TOKEN"], kafka_token);

    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["credential_sha256"], sha256_hex(kafka_token.as_bytes()));
    assert_eq!(row["job_token_sha256"], sha256_hex(token.as_bytes()));
    assert_eq!(row["project_path"], "platform/orders");
    assert_eq!(row["job_id"], "123456");
    assert_eq!(row["pipeline_id"], "9001");
    assert_eq!(row["runner_id"], 42);
    assert_eq!(row["user_login"], "alice");
    assert_eq!(row["requested_ttl_seconds"], 600);
    assert_eq!(row["granted_ttl_seconds"], 600);
    assert_eq!(row["claims"]["ref_protected"], "true");
    let stored = row.to_string();
    assert!(!stored.contains(kafka_token) && !stored.contains(&token), "no secret in the audit row");
}

#[tokio::test]
async fn minted_kafka_token_verifies_against_the_published_jwks() {
    let app = TestApp::spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), role("orders-producer")).await;
    assert_eq!(status, 200, "{body}");
    let kafka_token = body["credential"]["token"].as_str().unwrap();

    // Fetched over HTTP, the way Kafka's validator gets it.
    let discovery: Value = reqwest::get(format!("{}/.well-known/openid-configuration", app.url)).await.unwrap().json().await.unwrap();
    assert_eq!(discovery["issuer"], app.public_url);
    let jwks: JwkSet = reqwest::get(discovery["jwks_uri"].as_str().unwrap()).await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(kafka_token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("kid published");
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&["kafka-test"]);
    validation.set_issuer(&[&app.public_url]);
    validation.leeway = 30;
    let claims = jsonwebtoken::decode::<Value>(kafka_token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).unwrap().claims;
    assert_eq!(claims["sub"], "ci:platform/orders");
    assert_eq!(claims["scope"], "orders.write");
    assert_eq!(claims["jti"], body["issuance_id"]);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 900, "default_ttl of the role");
}

/// PEERS.md: no Kafka broker here validates OAUTHBEARER, so validate as KIP-768 does with an
/// independent library (PyJWT, installed by scripts/test.sh), not with our own JWT code.
#[tokio::test]
async fn minted_kafka_token_passes_an_independent_kip768_validation() {
    let app = TestApp::spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), role("orders-producer")).await;
    assert_eq!(status, 200, "{body}");
    let (jwks_url, issuer) = (format!("{}/.well-known/jwks.json", app.url), app.public_url.clone());
    let validate = move |token: &str, audience: &str| common::kip768_validate(&jwks_url, audience, &issuer, token);
    let token = body["credential"]["token"].as_str().unwrap().to_owned();
    let output = tokio::task::spawn_blocking(move || (validate(&token, "kafka-test"), validate(&token, "kafka-other"))).await.unwrap();
    let (accepted, wrong_audience) = output;
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    let verdict: Value = serde_json::from_slice(&accepted.stdout).unwrap();
    assert_eq!(verdict, json!({"principal": "ci:platform/orders", "scope": ["orders.write"]}));
    assert!(!wrong_audience.status.success(), "a token for another audience must be rejected");
}

#[tokio::test]
async fn ttl_never_outlives_the_job() {
    let app = TestApp::spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = app.issuer.token_with(json!({"exp": now + 300}));
    let (status, _, body) = app.exchange(&token, json!({"role": "orders-producer", "ttl_seconds": 3600})).await;
    assert_eq!(status, 200, "{body}");
    let ttl = body["ttl_seconds"].as_i64().unwrap();
    assert!((295..=300).contains(&ttl), "capped at the deadline, got {ttl}");
    let expires = time::OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    let deadline = time::OffsetDateTime::parse(body["job_deadline"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    assert!(expires <= deadline);
    assert_eq!(deadline.unix_timestamp(), now + 300);

    // Capped by the role's max_ttl too.
    let long_job = app.issuer.token_with(json!({"exp": now + 7200}));
    let (_, _, body) = app.exchange(&long_job, json!({"role": "orders-producer", "ttl_seconds": 86400})).await;
    assert_eq!(body["ttl_seconds"], 3600);
}

#[tokio::test]
async fn ttl_that_cannot_be_met_is_refused_early_with_the_shortfall() {
    let app = TestApp::spawn().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = app.issuer.token_with(json!({"exp": now + 240}));
    let (status, _, body) = app.exchange(&token, json!({"role": "orders-producer", "min_ttl_seconds": 600})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "ttl_not_satisfiable");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("job deadline") && detail.contains("short by"), "{detail}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["code"].as_str()), (Some("denied"), Some("ttl_not_satisfiable")));

    // The role's own minimum (10 min) applies without any request minimum.
    let token = app.issuer.token_with(json!({"exp": now + 300}));
    let (status, _, body) = app.exchange(&token, role("orders-strict")).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("role's minimum is 600 s"), "{body}");
}

#[tokio::test]
async fn a_job_token_is_single_use_per_role() {
    let app = TestApp::spawn().await;
    let token = app.issuer.token();
    assert_eq!(app.exchange(&token, role("orders-producer")).await.0, 200);
    let (status, _, body) = app.exchange(&token, role("orders-producer")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "token_replayed");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!((row["decision"].as_str(), row["code"].as_str()), (Some("denied"), Some("token_replayed")));
    // The Kafka token is signed before its claim is refused; it never left, and the row says
    // nothing of it.
    assert_eq!((&row["credential_sha256"], &row["expires_at"], &row["credential_handle"]), (&Value::Null, &Value::Null, &Value::Null), "{row}");
    // Another role is a separate budget.
    assert_eq!(app.exchange(&token, role("orders-multi")).await.0, 200);
}

#[tokio::test]
async fn max_uses_per_token_is_enforced_under_concurrency() {
    let app = TestApp::spawn().await;
    let token = app.issuer.token();
    let attempts: Vec<_> = (0..10)
        .map(|_| {
            let (client, url, token) = (app.client.clone(), format!("{}/v1/credentials", app.url), token.clone());
            tokio::spawn(async move { client.post(url).bearer_auth(token).json(&role("orders-multi")).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 7, "{statuses:?}");
    let issued: i64 = sqlx::query_scalar("select count(*) from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(issued, 3);
}

#[tokio::test]
async fn policy_denials_do_not_reveal_whether_a_role_exists() {
    let app = TestApp::spawn().await;
    let unprotected = app.issuer.token_with(json!({"ref_protected": "false"}));
    let (status, _, known) = app.exchange(&unprotected, role("orders-producer")).await;
    assert_eq!(status, 403, "{known}");
    assert_eq!(known["code"], "access_denied");
    let (status, _, unknown) = app.exchange(&app.issuer.token(), role("no-such-role")).await;
    assert_eq!(status, 403);
    let normalise = |body: &Value| body["detail"].as_str().unwrap().replace("orders-producer", "R").replace("no-such-role", "R");
    assert_eq!(normalise(&known), normalise(&unknown), "same wording either way");

    // The audit row keeps the real reason.
    let row = app.audit_row(known["issuance_id"].as_str().unwrap()).await;
    assert!(row["detail"].as_str().unwrap().contains("ref_protected"), "{row}");
    let row = app.audit_row(unknown["issuance_id"].as_str().unwrap()).await;
    assert!(row["detail"].as_str().unwrap().contains("no role named"), "{row}");
}

/// Postgres cannot store U+0000: the row of a request carrying one used to fail, and with it
/// the whole group-commit batch it was in, so an exchange committed alongside got 503.
#[tokio::test]
async fn a_nul_in_a_request_is_recorded_and_fails_nobody_else() {
    let app = TestApp::spawn().await;
    let (first, second) = (app.issuer.token(), app.issuer.token());
    let poisoned = app.exchange(&first, role("orders\0producer"));
    let honest = app.exchange(&second, role("orders-producer"));
    let ((status, _, refused), (honest_status, _, issued)) = tokio::join!(poisoned, honest);
    assert_eq!((status, honest_status), (403, 200), "{refused} {issued}");
    let row = app.audit_row(refused["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["role"], "orders\u{FFFD}producer", "{row}");
}

#[tokio::test]
async fn a_claim_that_cannot_render_is_access_denied_not_a_malformed_credential() {
    let app = TestApp::spawn().await;
    // by-environment renders its principal from `environment`, which this job lacks.
    let (status, _, body) = app.exchange(&app.issuer.token(), role("by-environment")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("environment"), "{body}");
}

#[tokio::test]
async fn invalid_requests_are_rejected_and_recorded() {
    let app = TestApp::spawn().await;
    for body in [
        json!({"role": "orders-producer", "ttl_seconds": -1}),
        json!({"role": "orders-producer", "ttl_seconds": "900"}),
        json!({"role": "orders-producer", "surprise": true}),
        json!({"ttl_seconds": 900}),
        json!({"role": "orders-producer", "ttl_seconds": 300, "min_ttl_seconds": 600}),
    ] {
        let (status, headers, problem) = app.exchange(&app.issuer.token(), body.clone()).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(problem["code"], "invalid_request");
        let row = app.audit_row(problem["issuance_id"].as_str().unwrap()).await;
        assert_eq!(row["code"], "invalid_request");
        assert_eq!(row["project_path"], "platform/orders", "attributed to the verified job");
    }
    let oversized =
        app.client.post(format!("{}/v1/credentials", app.url)).bearer_auth(app.issuer.token()).body(vec![b' '; 70 * 1024]).send().await.unwrap();
    assert_eq!(oversized.status(), 413);
    assert_eq!(oversized.json::<Value>().await.unwrap()["code"], "payload_too_large");
}

#[tokio::test]
async fn postgres_outage_withholds_credentials_and_recovers_without_restart() {
    let database = common::fresh_database().await;
    let (proxy, proxied_url) = PostgresProxy::start(&database).await;
    let app = TestApp::spawn_with("database_acquire_timeout_seconds = 1", Some(proxied_url)).await;
    assert_eq!(app.exchange(&app.issuer.token(), role("orders-producer")).await.0, 200);

    proxy.down();
    let (status, _, body) = app.exchange(&app.issuer.token(), role("orders-producer")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "audit_unavailable");
    assert!(body.get("credential").is_none());
    let ready = reqwest::get(format!("{}/readyz", app.url)).await.unwrap();
    assert_eq!(ready.status(), 503);

    proxy.up();
    let (status, _, body) = app.exchange(&app.issuer.token(), role("orders-producer")).await;
    assert_eq!(status, 200, "recovered by itself: {body}");
    let issued: i64 = sqlx::query_scalar("select count(*) from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(issued, 2, "every credential that left has its row");
}

#[tokio::test]
async fn request_id_is_echoed_and_health_endpoints_answer() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(format!("{}/v1/credentials", app.url))
        .header("x-request-id", "ci-job-123")
        .bearer_auth(app.issuer.token())
        .json(&role("orders-producer"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "ci-job-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(app.audit_row(body["issuance_id"].as_str().unwrap()).await["request_id"], "ci-job-123");

    let health = reqwest::get(format!("{}/healthz", app.url)).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = reqwest::get(format!("{}/readyz", app.url)).await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    let missing = reqwest::get(format!("{}/nope", app.url)).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn jwks_publishes_only_public_key_material() {
    let app = TestApp::spawn().await;
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", app.url)).await.unwrap().json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "RSA");
    assert_eq!(keys[0]["use"], "sig");
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(keys[0].get(private).is_none(), "private parameter {private} published");
    }
    let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(keys[0]["n"].as_str().unwrap()).unwrap();
}

/// `token_use_counts` keeps a row per token and role; once a token is past its expiry it can
/// never verify again, so its rows are purged, in bounded batches, and a live token's stay:
/// its replay is still refused.
#[tokio::test]
async fn the_use_counts_of_expired_tokens_are_purged_in_batches() {
    let app = TestApp::spawn().await;
    let token = app.issuer.token();
    let (status, _, body) = app.exchange(&token, json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    sqlx::query(
        "insert into token_use_counts (issuer, jti, role, uses, max_uses, last_claimed, token_expires_at)
         select 'gitlab', 'expired-' || n, 'orders-producer', 1, 1, 1, now() - interval '1 hour' from generate_series(1, 5) n",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let store = app.state.broker.audit.store();
    let purged = store.purge_token_uses(time::OffsetDateTime::now_utc(), 2).await.unwrap();
    assert_eq!(purged, 5, "all expired rows, two at a time");
    let left: Vec<String> = sqlx::query_scalar("select jti from token_use_counts").fetch_all(&app.pool).await.unwrap();
    assert_eq!(left.len(), 1, "only the live token's count stays: {left:?}");
    let (status, _, body) = app.exchange(&token, json!({"role": "orders-producer"})).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("token_replayed")), "{body}");
}

/// SIGTERM to the binary while an exchange is in flight: the broker stops accepting, lets the
/// exchange finish and write its issued row, answers it, and exits 0.
#[tokio::test]
async fn sigterm_lets_an_exchange_in_flight_finish_and_record() {
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, common::config_text(&issuer.url, &database_url, &url, "")).unwrap();
    let log = dir.0.join("broker.log");
    let mut broker = common::start_binary(&config, port, &log).await;
    // The issued row takes a second to write: the exchange is in flight when the signal comes.
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::query(
        "create function slow_issued() returns trigger language plpgsql as $$ begin
             if new.decision = 'issued' then perform pg_sleep(1.5); end if; return new; end $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("create trigger slow_issued before insert on audit_events for each row execute function slow_issued()").execute(&pool).await.unwrap();

    let request =
        reqwest::Client::new().post(format!("{url}/v1/credentials")).bearer_auth(issuer.token()).json(&json!({"role": "orders-producer"})).send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // SAFETY: a signal to the child process this test started.
    unsafe { libc::kill(broker.0.id() as i32, libc::SIGTERM) };
    let response = in_flight.await.unwrap().expect("the exchange in flight is answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let status = tokio::task::spawn_blocking(move || broker.0.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit {status:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let issued: i64 = sqlx::query_scalar("select count(*) from audit_events where decision = 'issued' and id = $1::uuid")
        .bind(body["issuance_id"].as_str().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(issued, 1, "the answered credential has its row");
    assert!(reqwest::get(format!("{url}/healthz")).await.is_err(), "no longer accepting");
}

/// `trusted_proxies`: the audit row's `client_addr` is the right-most `X-Forwarded-For`
/// address that is not a trusted proxy, when the TCP peer is one; otherwise the header is
/// ignored and the peer is recorded.
#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    for (trusted, expected) in [("trusted_proxies = [\"127.0.0.1/32\"]", "203.0.113.7"), ("", "127.0.0.1")] {
        let app = TestApp::spawn_with(trusted, None).await;
        let response = app
            .client
            .post(format!("{}/v1/credentials", app.url))
            .bearer_auth(app.issuer.token())
            .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
            .json(&json!({"role": "orders-producer"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
        assert_eq!(row["client_addr"], expected, "{trusted:?}");
    }
    let error = format!(
        "{:#}",
        credbroker::config::Config::parse(
            &common::config_text(
                "https://gitlab.example.com",
                "postgres://127.0.0.1:1/x",
                "http://127.0.0.1:1",
                "trusted_proxies = [\"10.0.0.0/40\"]"
            ),
            std::path::Path::new("/etc/credbroker.toml"),
            std::iter::empty(),
        )
        .unwrap_err()
    );
    assert!(error.contains("trusted_proxies") && error.contains("prefix"), "{error}");
}
