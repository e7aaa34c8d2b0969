//! Issue 14 on real Postgres with the real broker: links between audit rows are typed columns
//! the broker writes from verified facts, so no caller can write into another issuance's
//! history (`x-request-id`, `renews`), and freezes and revocations by project match every
//! project identity a token carries.

mod common;

use common::{TestApp, POLICIES};
use serde_json::{json, Value};

const AUDITOR_PROJECT: &str = "security/audit";
const ADMIN_PROJECT: &str = "security/credbroker-admin";

async fn spawn() -> TestApp {
    let policies = format!(
        "[auditors]\nissuer = \"gitlab\"\n[auditors.claims]\nproject_path = \"{AUDITOR_PROJECT}\"\n\n\
         [admins]\nissuer = \"gitlab\"\n[admins.claims]\nproject_path = \"{ADMIN_PROJECT}\"\n\n{POLICIES}"
    );
    TestApp::spawn_full("", "", &policies, None).await
}

fn auditor_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT, "user_login": "sec-eve"}))
}

fn admin_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": ADMIN_PROJECT, "user_login": "sec-oncall"}))
}

/// A token of job `job_id` with the orders-multi role's claims (3 uses per token).
fn job_token(app: &TestApp, job_id: &str) -> String {
    app.issuer.token_with(json!({"job_id": job_id}))
}

async fn exchange_with_request_id(app: &TestApp, token: &str, body: Value, request_id: &str) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/v1/credentials", app.url))
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn lifecycle(app: &TestApp, issuance: &str) -> Value {
    let response = app.client.get(format!("{}/v1/issuances/{issuance}", app.url)).bearer_auth(auditor_token(app)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

fn steps(lifecycle: &Value) -> Vec<(String, String)> {
    lifecycle["lifecycle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| (step["event"].as_str().unwrap().to_owned(), step["id"].as_str().unwrap().to_owned()))
        .collect()
}

async fn issue(app: &TestApp, token: &str, body: Value) -> String {
    let (status, _, body) = app.exchange(token, body).await;
    assert_eq!(status, 200, "{body}");
    body["issuance_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_request_id_naming_another_issuance_links_nothing() {
    let app = spawn().await;
    let victim = issue(&app, &job_token(&app, "1001"), json!({"role": "orders-multi"})).await;
    let forged = format!("revocation:{victim}");

    // A garbage token, and a valid exchange of another job, both claiming to be B's revocation.
    let (status, _) = exchange_with_request_id(&app, "not-a-token", json!({"role": "orders-multi"}), &forged).await;
    assert_eq!(status, 401);
    let (status, body) = exchange_with_request_id(&app, &job_token(&app, "2002"), json!({"role": "orders-multi"}), &forged).await;
    assert_eq!(status, 200, "{body}");

    let history = lifecycle(&app, &victim).await;
    assert_eq!(steps(&history), vec![("issued".to_owned(), victim.clone())], "{history}");
    // The /audit page's record view shows the same lifecycle.
    let page = app
        .client
        .get(format!("{}/audit/issuances/{victim}", app.url))
        .header("cookie", format!("credbroker_audit={}", auditor_token(&app)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&victim), "the record page rendered: {page}");
    assert!(!page.contains(body["issuance_id"].as_str().unwrap()), "no step of another job on the page: {page}");
    // The header stays a correlation string on the caller's own row.
    let attacker_row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(attacker_row["request_id"], forged);
    assert_eq!(attacker_row["about_issuance_id"], Value::Null);
    assert_eq!(attacker_row["renews_issuance_id"], Value::Null);
}

#[tokio::test]
async fn a_renewal_is_accepted_only_from_the_same_job() {
    let app = spawn().await;
    let job_a = job_token(&app, "1001");
    let first = issue(&app, &job_a, json!({"role": "orders-multi"})).await;

    // Another job of the same project claims to renew A's issuance: refused, and audited.
    let (status, _, problem) = app.exchange(&job_token(&app, "2002"), json!({"role": "orders-multi", "renews": first})).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "invalid_request");
    assert!(problem["detail"].as_str().unwrap().contains("another job"), "{problem}");
    let refused = app.audit_row(problem["issuance_id"].as_str().unwrap()).await;
    assert_eq!(refused["decision"], "denied");
    assert_eq!(refused["code"], "invalid_request");
    assert_eq!(refused["renews_issuance_id"], Value::Null, "a refused claim links nothing");

    // A renewal that names an issuance that does not exist.
    let (status, _, problem) = app.exchange(&job_a, json!({"role": "orders-multi", "renews": uuid::Uuid::new_v4()})).await;
    assert_eq!(status, 400, "{problem}");

    // The same job renews: linked by a typed column to the first issuance, shown as a step.
    let renewal = issue(&app, &job_a, json!({"role": "orders-multi", "renews": first})).await;
    let row = app.audit_row(&renewal).await;
    assert_eq!(row["renews_issuance_id"], first.as_str());
    assert_eq!(row["detail"], Value::Null, "the link lives in its column, not in prose");
    let history = lifecycle(&app, &first).await;
    assert_eq!(steps(&history), vec![("issued".to_owned(), first.clone()), ("renewed".to_owned(), renewal.clone())], "{history}");
    assert_eq!(lifecycle(&app, &renewal).await["renews"], first.as_str());
}

#[tokio::test]
async fn without_a_job_id_only_the_same_job_token_renews() {
    let app = spawn().await;
    // A generic issuer's tokens: no job_id, and one subject for every run of the automation.
    let first_token = app.issuer.token_with(json!({"job_id": null}));
    let first = issue(&app, &first_token, json!({"role": "orders-multi"})).await;

    let (status, _, problem) = app.exchange(&app.issuer.token_with(json!({"job_id": null})), json!({"role": "orders-multi", "renews": first})).await;
    assert_eq!(status, 400, "absent job ids do not make two runs one job: {problem}");
    let (status, _, problem) =
        app.exchange(&app.issuer.token_with(json!({"job_id": null, "sub": "someone-else"})), json!({"role": "orders-multi", "renews": first})).await;
    assert_eq!(status, 400, "{problem}");

    let renewal = issue(&app, &first_token, json!({"role": "orders-multi", "renews": first})).await;
    assert_eq!(app.audit_row(&renewal).await["renews_issuance_id"], first.as_str());
    // Renewing the renewal still names the first issuance of the chain.
    let again = issue(&app, &first_token, json!({"role": "orders-multi", "renews": renewal})).await;
    assert_eq!(app.audit_row(&again).await["renews_issuance_id"], first.as_str());
    let history = lifecycle(&app, &first).await;
    assert_eq!(steps(&history).len(), 3, "{history}");
}

#[tokio::test]
async fn a_project_freeze_matches_every_project_identity_of_the_token() {
    let app = spawn().await;
    let response = app
        .client
        .post(format!("{}/v1/freezes", app.url))
        .bearer_auth(admin_token(&app))
        .json(&json!({"project": "platform/orders"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap());

    // A fork's merge request pipeline: the upstream project only in job_project_path.
    let fork = app.issuer.token_with(json!({"project_path": "someone/orders-fork", "namespace_path": "someone"}));
    // A token with no project_path at all.
    let bare = app.issuer.token_with(json!({"project_path": null, "project_id": null}));
    for (what, token) in [("fork merge request", fork), ("no project_path", bare)] {
        let (status, _, problem) = app.exchange(&token, json!({"role": "orders-producer"})).await;
        assert_eq!(status, 403, "{what}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("frozen"), "{what}: {problem}");
    }
    // Another project is not touched.
    let other = app.issuer.token_with(json!({
        "project_path": "platform/billing", "job_project_path": "platform/billing", "project_id": "43", "job_project_id": "43"
    }));
    let (status, _, body) = app.exchange(&other, json!({"role": "orders-multi"})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_freeze_by_project_id_and_a_namespace_freeze_match_too() {
    let app = spawn().await;
    let freeze = |body: Value| {
        let app = &app;
        async move {
            let response = app.client.post(format!("{}/v1/freezes", app.url)).bearer_auth(admin_token(app)).json(&body).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
    };
    freeze(json!({"project": "42"})).await;
    let (status, _, problem) =
        app.exchange(&app.issuer.token_with(json!({"project_path": "renamed/orders"})), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 403, "project_id 42 is frozen: {problem}");
    let billing = json!({"project_path": "platform/billing", "job_project_path": "platform/billing", "project_id": "43", "job_project_id": "43"});
    let (status, _, body) = app.exchange(&app.issuer.token_with(billing.clone()), json!({"role": "orders-multi"})).await;
    assert_eq!(status, 200, "{body}");
    // A namespace: every project in it.
    freeze(json!({"project": "platform"})).await;
    let (status, _, problem) = app.exchange(&app.issuer.token_with(billing), json!({"role": "orders-multi"})).await;
    assert_eq!(status, 403, "namespace platform is frozen: {problem}");
}

#[tokio::test]
async fn revoke_by_project_selects_a_fork_merge_request_credential() {
    let app = spawn().await;
    let fork = app.issuer.token_with(json!({"project_path": "someone/orders-fork", "project_id": "99", "namespace_path": "someone"}));
    let issuance = issue(&app, &fork, json!({"role": "orders-producer"})).await;
    let response = app
        .client
        .post(format!("{}/v1/revocations", app.url))
        .bearer_auth(admin_token(&app))
        .json(&json!({"project": "platform/orders", "dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    let matched: Vec<&str> = body["credentials"].as_array().unwrap().iter().map(|c| c["issuance_id"].as_str().unwrap()).collect();
    assert_eq!(matched, vec![issuance.as_str()], "{body}");
}

/// Rows written before migration 0023 keep their claims as jsonb in `claims`; the broker reads
/// them there as it reads `claims_json` in rows written since: in the issuance's detail and in
/// a revocation by project, which matches a fork's credential through its claims alone.
#[tokio::test]
async fn a_row_written_before_the_claims_became_json_reads_and_revokes_as_one_written_since() {
    let app = spawn().await;
    let fork = app.issuer.token_with(json!({"project_path": "someone/orders-fork", "project_id": "99", "namespace_path": "someone"}));
    let written_since = issue(&app, &fork, json!({"role": "orders-producer"})).await;
    let written_before = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, role, target, backend, issuer, subject, project_path,
             job_project_path, credential_sha256, credential_handle, expires_at, job_deadline, claims)
         select $1, occurred_at, request_id, decision, role, target, backend, issuer, subject, project_path,
             job_project_path, credential_sha256, credential_handle, expires_at, job_deadline, claims_json::jsonb
         from audit_events where id = $2::uuid",
    )
    .bind(written_before)
    .bind(&written_since)
    .execute(&app.pool)
    .await
    .unwrap();
    let (old, new): (Option<Value>, Option<Value>) =
        sqlx::query_as("select (select claims_json::jsonb from audit_events where id = $1), (select claims from audit_events where id = $2::uuid)")
            .bind(written_before)
            .bind(&written_since)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((old, new), (None, None), "each row holds its claims in one column only");

    let before = lifecycle(&app, &written_before.to_string()).await;
    let since = lifecycle(&app, &written_since).await;
    assert_eq!(before["issuance"]["claims"]["project_path"], "someone/orders-fork", "{before}");
    assert_eq!(before["issuance"]["claims"], since["issuance"]["claims"]);

    let response = app
        .client
        .post(format!("{}/v1/revocations", app.url))
        .bearer_auth(admin_token(&app))
        .json(&json!({"project": "platform/orders", "dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    let mut matched: Vec<&str> = body["credentials"].as_array().unwrap().iter().map(|c| c["issuance_id"].as_str().unwrap()).collect();
    matched.sort();
    let before_id = written_before.to_string();
    let mut expected = vec![before_id.as_str(), written_since.as_str()];
    expected.sort();
    assert_eq!(matched, expected, "{body}");
}
