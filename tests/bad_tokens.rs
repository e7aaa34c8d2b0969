//! Every way a job token can be wrong: status, code, WWW-Authenticate and the audit row.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::TestApp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A JWS with exactly this header, signed RS256 by the test issuer's published key.
fn signed_with_header(header: &Value, claims: &Value) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let key = EncodingKey::from_rsa_pem(common::rsa_pem(0).as_bytes()).unwrap();
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).unwrap();
    format!("{message}.{signature}")
}

/// The problem's body, once status, code, challenge and the audit row are as they must be.
async fn assert_refused(app: &TestApp, case: &str, token: &str, status: u16, code: &str) -> Value {
    let request_id = format!("case-{}", case.replace(' ', "-"));
    let response = app
        .client
        .post(format!("{}/v1/credentials", app.url))
        .header("x-request-id", &request_id)
        .header("authorization", format!("Bearer {token}"))
        .json(&json!({"role": "orders-producer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), status, "{case}");
    assert_eq!(response.headers()["content-type"], "application/problem+json", "{case}");
    if status == 401 {
        let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.starts_with("Bearer "), "{case}: {challenge}");
    }
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{case}: {body}");
    assert!(!body.to_string().contains(token) || token.len() < 8, "{case}: the token is echoed back");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "denied", "{case}");
    assert_eq!(row["code"], code, "{case}");
    assert_eq!(row["request_id"], request_id, "{case}");
    assert!(row["claims"].is_null(), "{case}: unverified claims are not stored as if they were facts");
    body
}

#[tokio::test]
async fn bad_token_matrix() {
    let app = TestApp::spawn().await;
    let issuer = &app.issuer;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let kid = issuer.key(0).kid().to_owned();
    let claims = Value::Object(issuer.claims());

    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": kid})), b64(&claims));
    let alg_none_upper = format!("{}.{}.", b64(&json!({"alg": "NONE", "typ": "JWT"})), b64(&claims));
    // The classic confusion attack: HS256 keyed with the issuer's public key.
    let public_pem = {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(common::rsa_pem(0)).unwrap();
        private.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()
    };
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    let hs256 = jsonwebtoken::encode(&hs_header, &claims, &EncodingKey::from_secret(public_pem.as_bytes())).unwrap();
    let unknown_kid = {
        let stranger = issuer.key(1);
        stranger.sign(&claims).unwrap()
    };
    let good = issuer.token();
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        let mut altered = claims.clone();
        altered["project_path"] = json!("platform/payments");
        format!("{}.{}.{}", parts[0], b64(&altered), parts[2])
    };

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("alg none", alg_none, 401, "invalid_token"),
        ("alg NONE", alg_none_upper, 401, "invalid_token"),
        ("hs256 with public key", hs256, 401, "invalid_token"),
        ("unknown kid", unknown_kid, 401, "invalid_token"),
        ("expired", issuer.token_with(json!({"exp": now - 120, "iat": now - 400, "nbf": now - 400})), 401, "invalid_token"),
        ("not yet valid", issuer.token_with(json!({"nbf": now + 600})), 401, "invalid_token"),
        ("missing nbf", issuer.token_with(json!({"nbf": null})), 401, "invalid_token"),
        ("issued in the future", issuer.token_with(json!({"iat": now + 600})), 401, "invalid_token"),
        ("wrong audience", issuer.token_with(json!({"aud": "someone-else"})), 401, "invalid_token"),
        ("missing audience", issuer.token_with(json!({"aud": null})), 401, "invalid_token"),
        ("missing jti", issuer.token_with(json!({"jti": null})), 401, "invalid_token"),
        ("unconfigured issuer", issuer.token_with(json!({"iss": "https://evil.example.com"})), 401, "untrusted_issuer"),
        ("tampered payload", tampered, 401, "invalid_token"),
        ("oversized", format!("{}.{}.sig", b64(&json!({"alg": "RS256"})), "A".repeat(17 * 1024)), 401, "invalid_token"),
        ("garbage", "not-a-jwt".to_owned(), 401, "invalid_token"),
        ("three garbage parts", "a.b.c".to_owned(), 401, "invalid_token"),
    ];
    for (case, token, status, code) in &cases {
        assert_refused(&app, case, token, *status, code).await;
    }
    // The good token still works after all that.
    assert_eq!(app.exchange(&good, json!({"role": "orders-producer"})).await.0, 200);
}

/// RFC 7515 section 4.1.11: `crit` lists extensions the recipient must understand; the broker
/// understands none, and an empty or malformed `crit` is invalid in itself. Signed by the
/// issuer's real key, so `crit` is the only thing wrong.
#[tokio::test]
async fn critical_header_extensions_are_refused() {
    let app = TestApp::spawn().await;
    let kid = app.issuer.key(0).kid().to_owned();
    let claims = || Value::Object(app.issuer.claims());
    let header = |crit: Option<Value>| {
        let mut header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        if let Some(crit) = crit {
            header["crit"] = crit;
            header["urn:example:must-understand"] = json!("1");
        }
        header
    };
    let cases = [
        ("crit names an unknown extension", json!(["urn:example:must-understand"]), "marks extensions"),
        ("crit names a registered parameter", json!(["exp"]), "marks extensions"),
        ("crit is empty", json!([]), "non-empty list"),
        ("crit is not a list", json!("urn:example:must-understand"), "non-empty list"),
        ("crit lists a number", json!([7]), "non-empty list"),
        ("crit is null", Value::Null, "non-empty list"),
    ];
    for (case, crit, says) in cases {
        let token = signed_with_header(&header(Some(crit)), &claims());
        let body = assert_refused(&app, case, &token, 401, "invalid_token").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("`crit`") && detail.contains(says), "{case}: {detail}");
    }
    let plain = signed_with_header(&header(None), &claims());
    assert_eq!(app.exchange(&plain, json!({"role": "orders-producer"})).await.0, 200, "the same token without crit is fine");
    // Section 4.1: parameters the broker does not understand are ignored unless `crit` names
    // them, whatever their JSON type.
    let mut unknown = header(None);
    unknown["typ"] = json!(7);
    unknown["urn:example:extra"] = json!({"nested": [true, null]});
    let token = signed_with_header(&unknown, &claims());
    assert_eq!(app.exchange(&token, json!({"role": "orders-producer"})).await.0, 200, "unknown header parameters are ignored");
}

/// `nbf`: required from issuers by default (GitLab always sends it); `require_nbf = false`
/// accepts a generic identity provider's tokens without one, and still checks one that is there.
#[tokio::test]
async fn nbf_is_required_unless_the_issuer_is_configured_not_to_send_it() {
    let generic = common::TestIssuer::start().await;
    let tables = format!("[[issuers]]\nname = \"generic\"\nissuer = \"{}\"\nrequire_nbf = false\n", generic.url);
    let policies = format!(
        "{}\n[[role]]\nname = \"generic-producer\"\nbackend = \"kafka\"\nissuer = \"generic\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
         principal = \"ci:{{sub}}\"\n[role.claims]\nproject_path = \"platform/orders\"\n",
        common::POLICIES
    );
    let app = TestApp::spawn_full("", &tables, &policies, None).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let request = json!({"role": "generic-producer"});

    let (status, _, body) = app.exchange(&generic.token_with(json!({"nbf": null})), request.clone()).await;
    assert_eq!(status, 200, "a generic issuer's token without nbf: {body}");
    let (status, _, body) = app.exchange(&generic.token_with(json!({"nbf": now + 600})), request.clone()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "a present nbf is still checked: {body}");
    assert_eq!(app.exchange(&generic.token(), request).await.0, 200);

    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"nbf": null})), json!({"role": "orders-producer"})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "the GitLab issuer still requires it: {body}");
    assert!(body["detail"].as_str().unwrap().contains("`nbf`"), "{body}");
}

#[tokio::test]
async fn missing_or_non_bearer_authorization_is_invalid_token() {
    let app = TestApp::spawn().await;
    for authorization in [None, Some("Basic dXNlcjpwYXNz"), Some("Bearer ")] {
        let mut request = app.client.post(format!("{}/v1/credentials", app.url)).json(&json!({"role": "orders-producer"}));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert!(response.headers().contains_key("www-authenticate"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "invalid_token");
    }
}

#[tokio::test]
async fn an_unconfigured_issuer_is_rejected_before_any_network_call() {
    let app = TestApp::spawn().await;
    let before = app.issuer.jwks_fetches();
    let token = app.issuer.token_with(json!({"iss": format!("{}-other", app.issuer.url)}));
    let (status, _, body) = app.exchange(&token, json!({"role": "orders-producer"})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("untrusted_issuer")));
    assert_eq!(app.issuer.jwks_fetches(), before, "no fetch for an issuer we do not trust");
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let app = TestApp::spawn().await;
    assert_eq!(app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await.0, 200);
    let after_first = app.issuer.jwks_fetches();
    assert_eq!(after_first, 1);
    for _ in 0..20 {
        let forged = app.issuer.key(1).sign(&app.issuer.claims()).unwrap();
        let (status, _, _) = app.exchange(&forged, json!({"role": "orders-producer"})).await;
        assert_eq!(status, 401);
    }
    assert!(app.issuer.jwks_fetches() <= after_first + 1, "a flood of unknown kids must not hammer the issuer");
}

#[tokio::test]
async fn keys_rotated_out_of_the_jwks_stop_verifying_after_the_next_fetch() {
    let app = TestApp::spawn_with("jwks_max_age_seconds = 1\njwks_min_refetch_seconds = 1", None).await;
    assert_eq!(app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await.0, 200);
    // The issuer rotates: key 0 gone, key 1 in.
    app.issuer.publish(&[1]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let new_key_token = app.issuer.key(1).sign(&app.issuer.claims()).unwrap();
    assert_eq!(app.exchange(&new_key_token, json!({"role": "orders-producer"})).await.0, 200);
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");
}

#[tokio::test]
async fn floods_of_unattributable_denials_are_aggregated_not_lost() {
    let app = TestApp::spawn_with("unattributed_denials_per_minute = 2", None).await;
    for _ in 0..7 {
        assert_eq!(app.exchange("garbage", json!({"role": "orders-producer"})).await.0, 401);
    }
    assert_eq!(app.audit_count().await, 2, "only the budget gets full rows");
    app.state.broker.audit.flush_unattributed().await.unwrap();
    let (rows, occurrences): (i64, i64) = sqlx::query_as("select count(*), sum(occurrences)::bigint from audit_events where code = 'invalid_token'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((rows, occurrences), (3, 7), "two full rows plus one aggregate of five");
    // A verified job is never subject to that budget.
    assert_eq!(app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await.0, 200);
}
