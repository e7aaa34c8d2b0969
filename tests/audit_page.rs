//! Issue 7's `/audit` page on real Postgres with the real broker. Headless Chromium (Debian's
//! `chromium` and `chromedriver`, driven by tests/audit_page_browser.py) signs in, checks that
//! the chart draws, filters and opens a record whose claims hold markup. The HTTP-level test
//! covers the session cookie, security headers and refusals. Both check that every view is
//! recorded before anything is shown.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{seed_audit_row, TestApp, POLICIES};
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use uuid::Uuid;

const AUDITOR_PROJECT: &str = "security/audit";

const LINKS: &str = r#"
[audit_page.links.gitlab]
commit = "https://git.example.com/{project_path}/-/commit/{sha}"
pipeline = "https://git.example.com/{project_path}/-/pipelines/{pipeline_id}"
user = "https://git.example.com/{user_login}"
"#;

async fn spawn() -> TestApp {
    let policies = format!("[auditors]\nissuer = \"gitlab\"\n[auditors.claims]\nproject_path = \"{AUDITOR_PROJECT}\"\n\n{POLICIES}");
    TestApp::spawn_full("", LINKS, &policies, None).await
}

fn auditor_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT, "user_login": "sec-eve"}))
}

fn hours_ago(hours: i64) -> String {
    (time::OffsetDateTime::now_utc() - time::Duration::hours(hours)).format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Rows show once every older transaction on the cluster has finished; the browser must not
/// race that.
async fn wait_until_listed(app: &TestApp, token: &str, ids: &[Uuid]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page: Value =
            app.client.get(format!("{}/v1/issuances?limit=1000", app.url)).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        let listed: BTreeSet<&str> = page["items"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap()).collect();
        if ids.iter().all(|id| listed.contains(id.to_string().as_str())) {
            return;
        }
        assert!(Instant::now() < deadline, "seeded rows never became visible");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

#[tokio::test]
async fn an_auditor_loads_filters_and_opens_a_record_in_chromium() {
    let app = spawn().await;
    let auditor = auditor_token(&app);
    let (status, _, issued) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{issued}");
    let issued_id = Uuid::parse_str(issued["issuance_id"].as_str().unwrap()).unwrap();

    let mut seeded = vec![issued_id];
    // The oldest row is an issued aws one, so aws takes the chart's first colour with solid bars.
    for (hours, decision, target, project) in [
        (120, "issued", "aws", "platform/payments"),
        (96, "issued", "aws", "platform/payments"),
        (72, "issued", "aws", "platform/payments"),
        (48, "denied", "aws", "platform/payments"),
        (30, "denied", "aws", "platform/payments"),
        (20, "denied", "kafka", "data/warehouse"),
        (10, "denied", "kafka", "data/warehouse"),
    ] {
        let credential = (decision == "issued").then(|| format!("{:064x}", seeded.len()));
        seeded.push(
            seed_audit_row(
                &app.pool,
                json!({"occurred_at": hours_ago(hours), "decision": decision, "target": target, "role": format!("{target}-role"),
                       "issuer": "gitlab", "project_path": project, "code": (decision == "denied").then_some("access_denied"),
                       "credential_sha256": credential}),
            )
            .await,
        );
    }
    let hostile_login = "<img src=x onerror=credbrokerPwned=1>";
    let hostile_ref = "</script><script>window.credbrokerPwned=1</script>";
    let hostile_claims = json!({"project_path": "platform/x", "sha": sha(7), "pipeline_id": "77", "user_login": hostile_login, "ref": hostile_ref});
    let hostile = seed_audit_row(
        &app.pool,
        json!({"occurred_at": hours_ago(2), "decision": "denied", "code": "access_denied", "role": "hostile", "target": "snowflake",
               "issuer": "gitlab", "project_path": "platform/x", "sha": sha(7), "pipeline_id": "77", "user_login": hostile_login,
               "claims": hostile_claims}),
    )
    .await;
    seeded.push(hostile);
    wait_until_listed(&app, &auditor, &seeded).await;

    let kafka_target: String =
        sqlx::query_scalar("select target from audit_events where id = $1").bind(issued_id).fetch_one(&app.pool).await.unwrap();
    let mut legend = vec!["aws issued", "aws denied", "kafka denied", "snowflake denied", "audit_log denied"]
        .into_iter()
        .map(str::to_owned)
        .collect::<BTreeSet<String>>();
    legend.insert(format!("{kafka_target} issued"));
    let expect = json!({
        "reader": "sec-eve",
        "seeded_ids": seeded.iter().map(|id| id.to_string()[..8].to_owned()).collect::<Vec<_>>(),
        "datasets": legend.len(),
        "legend": legend,
        "filter_project": "platform/**",
        "filter_prefix": "platform/",
        "filtered_rows": 3,
        "detail_role": "hostile",
        "detail_id": hostile.to_string(),
        "detail_claims": {"user_login": hostile_login, "ref": hostile_ref, "pipeline_id": "77"},
        "detail_links": {
            "commit": format!("https://git.example.com/platform/x/-/commit/{}", sha(7)),
            "pipeline": "https://git.example.com/platform/x/-/pipelines/77",
            "user": "https://git.example.com/%3Cimg%20src%3Dx%20onerror%3DcredbrokerPwned%3D1%3E",
        },
    });
    let outsider = app.issuer.token_with(json!({"project_path": "other/team", "user_login": "mallory"}));
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("audit-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let (url, screenshot_path) = (app.url.clone(), screenshot.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(common::repo_path("tests/audit_page_browser.py"))
            .env("AUDIT_URL", url)
            .env("AUDIT_EXPECT", expect.to_string())
            .env("AUDITOR_TOKEN", auditor)
            .env("OUTSIDER_TOKEN", outsider)
            .env("SCREENSHOT", screenshot_path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "browser run failed:\n{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // A PNG of the signed-in page with its chart (look at it: target/tmp/audit-page.png).
    let png = std::fs::read(&screenshot).expect("the browser saved a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot of {} bytes", png.len());

    // Every view was recorded, the refused sign-in as a denial of the audit log.
    let reads: Vec<String> = sqlx::query_scalar("select detail from audit_events where decision = 'audit_read' and detail like 'gitlab:%'")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(reads.iter().any(|detail| detail.contains("(user sec-eve): sign in to /audit")), "{reads:?}");
    assert!(reads.iter().any(|detail| detail.contains("GET /audit?") && detail.contains("decision=denied")), "the filtered view: {reads:?}");
    assert!(reads.iter().any(|detail| detail.ends_with(&format!("GET /audit/issuances/{hostile}"))), "the detail view: {reads:?}");
    let refused: i64 =
        sqlx::query_scalar("select count(*) from audit_events where decision = 'denied' and target = 'audit_log' and project_path = 'other/team'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(refused, 1);
}

fn cookie_of(response: &reqwest::Response) -> String {
    response.headers()[SET_COOKIE].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_session_cookie_headers_and_refusals() {
    let app = spawn().await;
    let client = reqwest::Client::builder().redirect(Policy::none()).build().unwrap();
    let page = |path: &str| format!("{}{path}", app.url);
    let reads = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from audit_events where decision = 'audit_read'").fetch_one(&app.pool).await.unwrap()
    };

    // No session: the sign-in form, with the page's security headers; nothing was read.
    let form = client.get(page("/audit")).send().await.unwrap();
    assert_eq!(form.status().as_u16(), 200);
    assert!(form.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    assert_eq!(form.headers()[CACHE_CONTROL], "no-store");
    let policy = form.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(form.text().await.unwrap().contains(r#"id="sign-in""#));
    assert_eq!(reads().await, 0);

    let token = auditor_token(&app);
    let sign_in =
        |token: String, site: &'static str| client.post(page("/audit/session")).header("sec-fetch-site", site).form(&[("token", token)]).send();
    // Another site cannot post a token into the form (login CSRF).
    assert_eq!(sign_in(token.clone(), "cross-site").await.unwrap().status().as_u16(), 403);
    // Not an auditor: 403, no cookie, and a denied row.
    let outsider = sign_in(app.issuer.token_with(json!({"project_path": "other/team"})), "same-origin").await.unwrap();
    assert_eq!(outsider.status().as_u16(), 403);
    assert!(outsider.headers().get(SET_COOKIE).is_none());
    assert!(outsider.text().await.unwrap().contains("Not an auditor"));

    let signed_in = sign_in(token.clone(), "same-origin").await.unwrap();
    assert_eq!(signed_in.status().as_u16(), 303);
    assert_eq!(signed_in.headers()[LOCATION], "/audit");
    let cookie = cookie_of(&signed_in);
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/audit"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http test broker: {cookie}");
    let max_age: i64 = cookie.split("Max-Age=").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&max_age), "the session ends with the token: {cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert_eq!(reads().await, 1, "signing in is a recorded read");

    let view = client.get(page("/audit")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(view.status().as_u16(), 200);
    let body = view.text().await.unwrap();
    assert!(body.contains(r#"id="records""#) && body.contains(r#"id="timeline-data""#) && body.contains("sec-eve"), "{body}");
    assert_eq!(reads().await, 2);

    // A bad filter names the parameter; ids that are not UUIDs or not in the log are refused.
    let bad = client.get(page("/audit?limit=5000")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().await.unwrap().contains("limit: must be a whole number"));
    let not_an_id = client.get(page("/audit/issuances/42")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(not_an_id.status().as_u16(), 400);
    let unknown = client.get(page(&format!("/audit/issuances/{}", Uuid::new_v4()))).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    // An expired token ends the session: back to the form, cookie cleared.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT, "iat": now - 7200, "nbf": now - 7200, "exp": now - 120}));
    let stale = client.get(page("/audit")).header(COOKIE, format!("credbroker_audit={expired}")).send().await.unwrap();
    assert_eq!(stale.status().as_u16(), 401);
    assert!(cookie_of(&stale).contains("Max-Age=0"));
    assert!(stale.text().await.unwrap().contains("Sign in again"));

    let signed_out = client.post(page("/audit/session/end")).header(COOKIE, &session).send().await.unwrap();
    assert_eq!(signed_out.status().as_u16(), 303);
    assert!(cookie_of(&signed_out).starts_with("credbroker_audit=;") && cookie_of(&signed_out).contains("Max-Age=0"));

    // The vendored chart library is served from the broker itself.
    let chart = client.get(page("/audit/assets/chart.umd.min.js")).send().await.unwrap();
    assert_eq!(chart.status().as_u16(), 200);
    assert!(chart.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/javascript"));
    assert!(chart.text().await.unwrap().starts_with("/*!\n * Chart.js v4.6.1"));
    assert_eq!(client.get(page("/audit/assets/../Cargo.toml")).send().await.unwrap().status().as_u16(), 404);

    // Verifying the session's token on every view spends none of its uses.
    let uses: i64 = sqlx::query_scalar("select count(*) from token_use_counts").fetch_one(&app.pool).await.unwrap();
    assert_eq!(uses, 0);
}
