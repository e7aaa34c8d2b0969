//! Issue 7 on real Postgres with the real broker: every filter of GET /v1/issuances, paging
//! while transactions commit out of order, `[auditors]` (403 audited, reads audited), CSV of
//! hostile claim values, one issuance's lifecycle, and `audit verify` catching an UPDATE, a
//! DELETE, a reordering and an out-of-order INSERT done directly in SQL.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{rsa_pem, seed_audit_row as insert, TestApp, POLICIES};
use credbroker::audit::checkpoints::FindingKind;
use credbroker::signing::SigningKey;
use serde_json::{json, Value};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

const AUDITOR_PROJECT: &str = "security/audit";

async fn spawn() -> TestApp {
    let policies = format!("[auditors]\nissuer = \"gitlab\"\n[auditors.claims]\nproject_path = \"{AUDITOR_PROJECT}\"\n\n{POLICIES}");
    TestApp::spawn_full("", "", &policies, None).await
}

fn auditor_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT, "user_login": "sec-eve"}))
}

async fn get(app: &TestApp, query: &str, token: &str) -> (u16, Value) {
    let response = app.client.get(format!("{}/v1/issuances?{query}", app.url)).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn ids(page: &Value) -> Vec<Uuid> {
    page["items"].as_array().unwrap().iter().map(|item| Uuid::parse_str(item["id"].as_str().unwrap()).unwrap()).collect()
}

/// Rows become visible once every transaction older than theirs has finished (other tests on
/// the cluster included): wait for them rather than race.
async fn wait_for_rows(app: &TestApp, query: &str, token: &str, count: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = get(app, query, token).await;
        assert_eq!(status, 200, "{page}");
        if page["items"].as_array().unwrap().len() >= count || Instant::now() > deadline {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_filter_selects_exactly_its_rows() {
    let app = spawn().await;
    let token = auditor_token(&app);
    let old = "2020-01-01T00:00:00Z";
    let a = insert(
        &app.pool,
        json!({"decision": "issued", "role": "orders-producer", "target": "kafka", "backend": "kafka", "issuer": "gitlab",
               "subject": "sub-a", "project_path": "platform/orders", "namespace_path": "platform", "pipeline_id": "100",
               "job_id": "1000", "sha": "aaaaaaa1111111111111111111111111111111111", "user_login": "alice",
               "credential_sha256": "a".repeat(64), "occurred_at": old}),
    )
    .await;
    let b = insert(
        &app.pool,
        json!({"decision": "denied", "code": "access_denied", "role": "orders-strict", "target": "snowflake", "backend": "sf",
               "issuer": "gitlab2", "subject": "sub-b", "project_path": "platform/billing/api", "namespace_path": "platform/billing",
               "pipeline_id": "200", "job_id": "2000", "sha": "bbbbbbb2222222222222222222222222222222222", "user_login": "bob"}),
    )
    .await;
    let c = insert(
        &app.pool,
        json!({"decision": "failed", "code": "backend_failed", "role": "aws-deploy", "target": "aws", "backend": "aws",
               "issuer": "gitlab", "subject": "sub-c", "project_path": "tools/ci", "namespace_path": "tools",
               "pipeline_id": "300", "job_id": "3000", "sha": "ccccccc3333333333333333333333333333333333", "user_login": "carol"}),
    )
    .await;
    wait_for_rows(&app, "decision=issued,denied,failed", &token, 3).await;

    let cases: Vec<(String, Vec<Uuid>)> = vec![
        (format!("since={}", "2021-01-01T00:00:00Z"), vec![b, c]),
        ("until=2021-01-01T00:00:00Z".into(), vec![a]),
        ("decision=denied".into(), vec![b]),
        ("decision=issued,failed".into(), vec![a, c]),
        ("code=backend_failed".into(), vec![c]),
        ("role=orders-strict".into(), vec![b]),
        ("target=aws".into(), vec![c]),
        ("backend=kafka".into(), vec![a]),
        ("issuer=gitlab2".into(), vec![b]),
        ("subject=sub-c".into(), vec![c]),
        ("project_path=platform/orders".into(), vec![a]),
        ("project_path=platform/*".into(), vec![a]),
        ("project_path=platform/**".into(), vec![a, b]),
        ("namespace_path=platform/billing".into(), vec![b]),
        ("pipeline_id=300".into(), vec![c]),
        ("job_id=1000".into(), vec![a]),
        ("sha=bbbbbbb2222222222222222222222222222222222".into(), vec![b]),
        ("sha=ccccccc".into(), vec![c]),
        ("user_login=alice".into(), vec![a]),
        (format!("credential_sha256={}", "a".repeat(64)), vec![a]),
        ("decision=issued,denied,failed&since=2021-01-01T00:00:00Z&namespace_path=tools".into(), vec![c]),
    ];
    for (query, expected) in cases {
        let (status, page) = get(&app, &query, &token).await;
        assert_eq!(status, 200, "{query}: {page}");
        let got: BTreeSet<Uuid> = ids(&page).into_iter().filter(|id| [a, b, c].contains(id)).collect();
        let others = ids(&page).len() - got.len();
        assert_eq!(got, expected.into_iter().collect(), "{query}");
        // Only audit_read rows of this test's own reads may match beyond the seeded ones.
        if !query.contains("decision") && !query.starts_with("since") {
            assert_eq!(others, 0, "{query}: {page}");
        }
    }

    for (query, parameter) in
        [("since=yesterday", "since"), ("limit=1001", "limit"), ("decision=granted", "decision"), ("colour=red", "colour"), ("cursor=x", "cursor")]
    {
        let (status, problem) = get(&app, query, &token).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(problem["code"], "invalid_request");
        assert_eq!(problem["parameter"], parameter, "{problem}");
        assert!(problem["detail"].as_str().unwrap().starts_with(parameter), "{problem}");
    }
}

/// The case a timestamp or sequence cursor gets wrong: a transaction that began earlier
/// commits after a later one, while a reader is paging.
#[tokio::test]
async fn pages_never_skip_rows_that_commit_late() {
    let app = spawn().await;
    let token = auditor_token(&app);
    for _ in 0..3 {
        insert(&app.pool, json!({"role": "seed"})).await;
    }
    wait_for_rows(&app, "role=seed", &token, 3).await;

    // Open (T1) before T2 commits; T1 commits only after the reader's first page.
    let mut late = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let mut t1 = late.begin().await.unwrap();
    let late_id = Uuid::new_v4();
    sqlx::query("insert into audit_events (id, occurred_at, request_id, decision, role) values ($1, now(), 'late', 'denied', 'seed')")
        .bind(late_id)
        .execute(&mut *t1)
        .await
        .unwrap();
    let early = insert(&app.pool, json!({"role": "seed"})).await;

    // Concurrent writers keep committing through the whole iteration.
    let pool = app.pool.clone();
    let writers = tokio::spawn(async move {
        let mut written = Vec::new();
        for _ in 0..30 {
            written.push(insert(&pool, json!({"role": "seed"})).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written
    });

    let (_, first) = get(&app, "role=seed&limit=2", &token).await;
    assert!(!ids(&first).contains(&early), "a row above an open transaction must wait for it: {first}");
    t1.commit().await.unwrap();
    let mut seen = ids(&first);
    let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
    while let Some(next) = cursor {
        let (status, page) = get(&app, &format!("role=seed&limit=2&cursor={next}"), &token).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    }
    writers.await.unwrap();

    // Everything at or below the first page's top, exactly once and in order.
    let all = ids(&wait_for_rows(&app, "role=seed&limit=1000", &token, 35).await);
    let top = all.iter().position(|id| *id == seen[0]).expect("the first row is still there");
    assert_eq!(seen, all[top..].to_vec(), "the iteration skipped or repeated rows");
    assert!(all.contains(&late_id) && all.contains(&early));
    assert_eq!(all.len(), 35);
}

#[tokio::test]
async fn only_auditors_read_and_every_read_is_recorded() {
    let app = spawn().await;
    let developer = app.issuer.token();
    let (status, problem) = get(&app, "role=x", &developer).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "access_denied");
    let denied: (String, String, String) =
        sqlx::query_as("select decision, code, detail from audit_events where target = 'audit_log' and decision = 'denied'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(denied.1, "access_denied");
    assert!(denied.2.contains("GET /v1/issuances?role=x") && denied.2.contains("not an auditor") && denied.2.contains("(user alice)"), "{denied:?}");

    let response = app.client.get(format!("{}/v1/issuances", app.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);

    let token = auditor_token(&app);
    let (status, _) = get(&app, "project_path=platform/**&limit=5", &token).await;
    assert_eq!(status, 200);
    let detail: String = sqlx::query_scalar("select detail from audit_events where decision = 'audit_read'").fetch_one(&app.pool).await.unwrap();
    assert!(detail.contains("(user sec-eve)") && detail.contains("project_path=platform/**&limit=5"), "{detail}");

    let response = app.client.get(format!("{}/v1/issuances/{}", app.url, Uuid::new_v4())).bearer_auth(&developer).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

#[tokio::test]
async fn csv_neutralises_hostile_claim_values() {
    let app = spawn().await;
    let token = auditor_token(&app);
    let hostile = insert(
        &app.pool,
        json!({"role": "csv", "user_login": "=HYPERLINK(\"http://evil\",\"x\")", "project_path": "+cmd|' /C calc'!A0",
               "subject": "-1+1", "pipeline_id": "1", "detail": "line one\nline \"two\", @SUM(A1)", "code": "@x"}),
    )
    .await;
    wait_for_rows(&app, "role=csv", &token, 1).await;
    let response =
        app.client.get(format!("{}/v1/issuances?role=csv", app.url)).bearer_auth(&token).header("accept", "text/csv").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let body = response.text().await.unwrap();
    // An independent parser (Python's csv module) must see one record with the header's width.
    let script = "import csv,sys,json\nrows=list(csv.reader(sys.stdin))\nprint(json.dumps(rows))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let rows: Vec<Vec<String>> = serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    assert_eq!(rows[0].len(), rows[1].len());
    let field = |name: &str| rows[1][rows[0].iter().position(|h| h == name).unwrap()].clone();
    assert_eq!(field("id"), hostile.to_string());
    assert_eq!(field("user_login"), "'=HYPERLINK(\"http://evil\",\"x\")");
    assert_eq!(field("project_path"), "'+cmd|' /C calc'!A0");
    assert_eq!(field("subject"), "'-1+1");
    assert_eq!(field("code"), "'@x");
    assert_eq!(field("detail"), "line one\nline \"two\", @SUM(A1)");
    for row in &rows[1..] {
        assert!(row.iter().all(|cell| !cell.starts_with(['=', '+', '-', '@'])), "{row:?}");
    }
}

#[tokio::test]
async fn one_issuance_with_its_renewal_and_revocation() {
    let app = spawn().await;
    let token = auditor_token(&app);
    let (status, _, first) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{first}");
    let first_id = first["issuance_id"].as_str().unwrap().to_owned();
    let (status, _, renewal) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer", "renews": first_id})).await;
    assert_eq!(status, 200, "{renewal}");
    // The row the revocation worker writes (src/revocation/mod.rs record_attempt).
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, detail, job_id, about_issuance_id)
         values ($1, now(), $2, 'revoked', $3, '123456', $4::uuid)",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4().to_string())
    .bind(format!("revoked issuance {first_id} (on_demand), attempt 1"))
    .bind(&first_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let response = app.client.get(format!("{}/v1/issuances/{first_id}", app.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["issuance"]["claims"]["pipeline_id"], "9001", "{body}");
    let events: Vec<&str> = body["lifecycle"].as_array().unwrap().iter().map(|step| step["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["issued", "renewed", "revoked"], "{body}");
    assert_eq!(body["lifecycle"][1]["id"], renewal["issuance_id"]);

    let response =
        app.client.get(format!("{}/v1/issuances/{}", app.url, renewal["issuance_id"].as_str().unwrap())).bearer_auth(&token).send().await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["renews"], first_id.as_str());

    let response = app.client.get(format!("{}/v1/issuances/not-a-uuid", app.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let response = app.client.get(format!("{}/v1/issuances/{}", app.url, Uuid::new_v4())).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

// ---------------------------------------------------------------- tamper evidence

/// A broker's store with `rows` decisions, sealed in checkpoints of `per_checkpoint`.
async fn sealed_log(rows: usize, per_checkpoint: i64) -> (credbroker::audit::PgAudit, PgPool, SigningKey, Vec<Uuid>) {
    let url = common::fresh_database().await;
    let store = credbroker::audit::PgAudit::connect(&secrecy::SecretString::from(url.clone()), 4, Duration::from_secs(5)).unwrap();
    credbroker::audit::migrate(store.pool()).await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..rows {
        ids.push(insert(&pool, json!({"role": format!("r{n}"), "claims": {"n": n, "user_login": "alice"}})).await);
    }
    let key = SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sealed = 0;
    while sealed < rows && Instant::now() < deadline {
        match store.seal_next(&key, "test", per_checkpoint).await.unwrap() {
            Some(checkpoint) => sealed += checkpoint.rows,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(sealed, rows);
    // Sealed order is (tx, id); the test names rows in that order.
    let ordered: Vec<Uuid> = sqlx::query_scalar("select id from audit_events order by tx, id").fetch_all(&pool).await.unwrap();
    (store, pool, key, ordered)
}

async fn as_superuser(pool: &PgPool, statement: &str, id: Uuid) {
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query("alter table audit_events disable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    sqlx::query(statement).bind(id).execute(&mut *transaction).await.unwrap();
    sqlx::query("alter table audit_events enable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    transaction.commit().await.unwrap();
}

#[tokio::test]
async fn verify_names_the_row_updated_deleted_reordered_or_inserted() {
    let (store, pool, key, rows) = sealed_log(12, 5).await;
    let report = store.verify_seals(&key, None).await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!((report.checkpoints, report.rows_checked, report.unsealed_rows), (3, 12, 0));

    as_superuser(&pool, "update audit_events set detail = 'nothing to see' where id = $1", rows[6]).await;
    let report = store.verify_seals(&key, None).await.unwrap();
    assert_eq!(report.findings.len(), 1, "{report:?}");
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::Altered, Some(rows[6])));

    let (store, pool, key, rows) = sealed_log(6, 100).await;
    as_superuser(&pool, "delete from audit_events where id = $1", rows[2]).await;
    let report = store.verify_seals(&key, None).await.unwrap();
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::Deleted, Some(rows[2])), "{report:?}");

    // Reordering: swap the places of rows 1 and 3 (their transaction ids).
    let (store, pool, key, rows) = sealed_log(6, 100).await;
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query("alter table audit_events disable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    sqlx::query(
        "update audit_events a set tx = b.tx from audit_events b
         where (a.id, b.id) in (($1, $2), ($2, $1))",
    )
    .bind(rows[1])
    .bind(rows[3])
    .execute(&mut *transaction)
    .await
    .unwrap();
    sqlx::query("alter table audit_events enable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    transaction.commit().await.unwrap();
    let report = store.verify_seals(&key, None).await.unwrap();
    // Under load the six rows may be sealed in two checkpoints, and a swap across their border
    // is reported from both sides; the first finding always names the first moved row.
    assert!(!report.intact(), "{report:?}");
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::Reordered, Some(rows[1])), "{report:?}");

    // A row slipped in among sealed ones (its tx set to a sealed row's).
    let (store, pool, key, rows) = sealed_log(4, 100).await;
    let forged = Uuid::new_v4();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, tx) select $1, now(), 'forged', 'denied', tx from audit_events where id = $2",
    )
    .bind(forged)
    .bind(rows[1])
    .execute(&pool)
    .await
    .unwrap();
    let report = store.verify_seals(&key, None).await.unwrap();
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::InsertedOutOfOrder, Some(forged)), "{report:?}");

    // A checkpoint rewritten to match: its signature gives it away.
    let (store, pool, key, _) = sealed_log(3, 100).await;
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query("alter table audit_checkpoints disable trigger audit_checkpoints_append_only").execute(&mut *transaction).await.unwrap();
    sqlx::query("update audit_checkpoints set row_count = 2").execute(&mut *transaction).await.unwrap();
    transaction.commit().await.unwrap();
    let report = store.verify_seals(&key, None).await.unwrap();
    assert_eq!(report.findings[0].kind, FindingKind::CheckpointInvalid, "{report:?}");
}

#[tokio::test]
async fn replicas_seal_concurrently_without_overlap() {
    let (store, pool, key, _) = sealed_log(0, 10).await;
    for n in 0..40 {
        insert(&pool, json!({"role": format!("r{n}")})).await;
    }
    let mut sealers = Vec::new();
    for replica in 0..4 {
        let (store, key) = (store.clone(), SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap());
        sealers.push(tokio::spawn(async move {
            let mut sealed = 0;
            for _ in 0..40 {
                if let Some(checkpoint) = store.seal_next(&key, &format!("replica {replica}"), 7).await.unwrap() {
                    sealed += checkpoint.rows;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sealed
        }));
    }
    let mut total = 0;
    for sealer in sealers {
        total += sealer.await.unwrap();
    }
    assert_eq!(total, 40);
    let report = store.verify_seals(&key, None).await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.rows_checked, 40);
}

#[tokio::test]
async fn the_broker_role_can_append_but_not_change_the_log() {
    let (_, pool, _, rows) = sealed_log(1, 10).await;
    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("set role credbroker_broker").execute(&mut *connection).await.unwrap();
    sqlx::query("insert into audit_events (id, occurred_at, request_id, decision) values ($1, now(), 'r', 'denied')")
        .bind(Uuid::new_v4())
        .execute(&mut *connection)
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("select count(*) from audit_events").fetch_one(&mut *connection).await.unwrap();
    assert_eq!(count, 2);
    for statement in [
        "update audit_events set detail = 'x' where id = $1",
        "delete from audit_events where id = $1",
        "alter table audit_events disable trigger audit_events_append_only",
        "delete from audit_checkpoints where number = 1 or $1 is null",
    ] {
        let query = sqlx::query(statement);
        let query = if statement.contains("$1") { query.bind(rows[0]) } else { query };
        let error = query.execute(&mut *connection).await.unwrap_err();
        assert!(error.to_string().contains("permission denied") || error.to_string().contains("must be owner"), "{statement}: {error}");
    }
    sqlx::query("reset role").execute(&mut *connection).await.unwrap();
}

// ---------------------------------------------------------------- CLI

fn credbroker(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"));
    command.args(args).env_remove("CREDBROKER_CONFIG").env_remove("CREDBROKER_DATABASE_URL");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn cli_queries_the_database_or_the_api_and_verifies() {
    let app = spawn().await;
    let token = auditor_token(&app);
    let seeded =
        insert(&app.pool, json!({"role": "cli", "project_path": "platform/orders", "user_login": "=evil", "occurred_at": "2024-01-01T00:00:00Z"}))
            .await;
    insert(&app.pool, json!({"role": "other"})).await;
    wait_for_rows(&app, "role=cli", &token, 1).await;
    let url = app.database_url.clone();
    let broker = app.url.clone();
    let (by_database, by_api, csv, bad) = tokio::task::spawn_blocking(move || {
        (
            credbroker(&["audit", "query", "--database-url", &url, "--role", "cli", "--json"], &[]),
            credbroker(&["audit", "query", "--url", &broker, "--role", "cli", "--since", "500w", "--json"], &[("CREDBROKER_ID_TOKEN", &token)]),
            credbroker(&["audit", "query", "--database-url", &url, "--project-path", "platform/*", "--csv"], &[]),
            credbroker(&["audit", "query", "--database-url", &url, "--since", "soon"], &[]),
        )
    })
    .await
    .unwrap();
    for output in [&by_database, &by_api] {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["id"], seeded.to_string());
    }
    let csv = String::from_utf8_lossy(&csv.stdout).to_string();
    assert!(csv.starts_with("\"id\",") && csv.contains("\"'=evil\""), "{csv}");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"), "{}", String::from_utf8_lossy(&bad.stderr));

    // verify: intact, then tampered (exit status 1, naming the row).
    let store = app.state.broker.audit.store().clone();
    let key = SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap();
    while store.seal_next(&key, "test", 1000).await.unwrap().is_some() {}
    let key_file = app.dir.0.join("seal.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    let (url, key_path) = (app.database_url.clone(), key_file.display().to_string());
    let intact =
        tokio::task::spawn_blocking(move || credbroker(&["audit", "verify", "--database-url", &url, "--key", &key_path], &[])).await.unwrap();
    assert!(intact.status.success(), "{}{}", String::from_utf8_lossy(&intact.stdout), String::from_utf8_lossy(&intact.stderr));
    assert!(String::from_utf8_lossy(&intact.stdout).starts_with("intact:"));
    as_superuser(&app.pool, "update audit_events set user_login = 'mallory' where id = $1", seeded).await;
    let (url, key_path) = (app.database_url.clone(), key_file.display().to_string());
    let tampered =
        tokio::task::spawn_blocking(move || credbroker(&["audit", "verify", "--database-url", &url, "--key", &key_path, "--since", "500w"], &[]))
            .await
            .unwrap();
    assert!(!tampered.status.success());
    let stdout = String::from_utf8_lossy(&tampered.stdout);
    assert!(stdout.starts_with(&format!("TAMPERED: row {seeded}")) && stdout.contains("altered"), "{stdout}");
}

#[tokio::test]
async fn a_broker_running_as_credbroker_broker_issues_and_seals() {
    let owner_url = common::fresh_database().await;
    let owner = PgPool::connect(&owner_url).await.unwrap();
    credbroker::audit::migrate(&owner).await.unwrap();
    let login = format!("credbroker_app_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("create role {login} login in role credbroker_broker")).execute(&owner).await.unwrap();
    let (base, database) = owner_url.rsplit_once('/').unwrap();
    let app_url = format!("{}/{database}", base.replacen("postgres@", &format!("{login}@"), 1));
    let app = TestApp::spawn_full("migrate_on_start = false", "", POLICIES, Some(app_url)).await;
    let (status, _, issued) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{issued}");
    let key = SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap();
    let store = app.state.broker.audit.store().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.seal_next(&key, "restricted", 100).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "nothing sealed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.verify_seals(&key, None).await.unwrap().intact());
    let error = sqlx::query("update audit_events set detail = 'x'").execute(store.pool()).await.unwrap_err();
    assert!(error.to_string().contains("permission denied"), "{error}");
}

/// `audit query --database-url` as a login of credbroker_auditor (read-only): the read is
/// recorded first, as an audit_read row naming that login, which the reader cannot choose.
/// A login that may SELECT but not record its reads is refused and shown nothing.
#[tokio::test]
async fn direct_database_reads_are_recorded_or_refused() {
    let owner_url = common::fresh_database().await;
    let owner = PgPool::connect(&owner_url).await.unwrap();
    credbroker::audit::migrate(&owner).await.unwrap();
    let seeded = insert(&owner, json!({"role": "direct", "project_path": "platform/orders"})).await;
    let suffix = Uuid::new_v4().simple().to_string();
    let (reader, outsider) = (format!("security_reader_{suffix}"), format!("select_only_{suffix}"));
    sqlx::query(&format!("create role {reader} login in role credbroker_auditor")).execute(&owner).await.unwrap();
    sqlx::query(&format!("create role {outsider} login")).execute(&owner).await.unwrap();
    sqlx::query(&format!("grant select on audit_events to {outsider}")).execute(&owner).await.unwrap();
    let (base, database) = owner_url.rsplit_once('/').unwrap();
    let login_url = |login: &str| format!("{}/{database}", base.replacen("postgres@", &format!("{login}@"), 1));
    let (reader_url, outsider_url) = (login_url(&reader), login_url(&outsider));
    let (read, refused) = tokio::task::spawn_blocking(move || {
        (
            credbroker(&["audit", "query", "--database-url", &reader_url, "--role", "direct", "--json"], &[]),
            credbroker(&["audit", "query", "--database-url", &outsider_url, "--role", "direct", "--json"], &[]),
        )
    })
    .await
    .unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&read.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], seeded.to_string());

    let recorded: Vec<(String, String, String)> =
        sqlx::query_as("select subject, target, detail from audit_events where decision = 'audit_read'").fetch_all(&owner).await.unwrap();
    assert_eq!(recorded.len(), 1, "only the auditor's read is recorded: {recorded:?}");
    let (subject, target, detail) = &recorded[0];
    assert_eq!((subject.as_str(), target.as_str()), (reader.as_str(), "audit_log"));
    assert!(detail.contains("audit query") && detail.contains("role=direct"), "{detail}");

    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty(), "an unrecorded read showed rows: {}", String::from_utf8_lossy(&refused.stdout));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refusing to read") && stderr.contains("credbroker_auditor"), "{stderr}");

    // The auditor can record reads but still cannot write any other kind of row.
    let reader_pool = PgPool::connect(&login_url(&reader)).await.unwrap();
    let forged = sqlx::query("insert into audit_events (id, occurred_at, request_id, decision) values ($1, now(), 'r', 'issued')")
        .bind(Uuid::new_v4())
        .execute(&reader_pool)
        .await
        .unwrap_err();
    assert!(forged.to_string().contains("permission denied"), "{forged}");
}

// ---------------------------------------------------------------- project_path globs

/// A piece of a generated glob: a literal character or a wildcard.
#[derive(Debug, Clone)]
enum GlobPiece {
    Char(char),
    Segment,
    Any,
}

/// Letters, the separator, and every character LIKE or a Postgres regex treats specially.
const GLOB_ALPHABET: &[char] =
    &['a', 'b', '/', '.', '_', '%', '\\', '-', '[', ']', '(', ')', '{', '}', '^', '$', '+', '?', '|', '<', '>', ' ', 'é', '1', '*', '\''];

fn glob_piece() -> impl proptest::strategy::Strategy<Value = GlobPiece> {
    use proptest::prelude::*;
    prop_oneof![
        4 => prop::sample::select(GLOB_ALPHABET).prop_filter("wildcards are pieces of their own", |c| *c != '*').prop_map(GlobPiece::Char),
        1 => Just(GlobPiece::Segment),
        1 => Just(GlobPiece::Any),
    ]
}

fn glob_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop::collection::vec(prop::sample::select(GLOB_ALPHABET), 0..6).prop_map(|chars| chars.into_iter().collect())
}

/// The audit query's `project_path` filter is a policy glob translated to SQL (a LIKE prefix
/// for the index, then a regex): for any pattern and any paths, Postgres must select exactly
/// the rows whose path the policy glob matches. Paths are mostly the pattern with its
/// wildcards filled in (so that some match), plus arbitrary ones.
#[test]
fn project_path_filters_select_exactly_what_the_policy_glob_matches() {
    use credbroker::audit::query::IssuanceFilter;
    use credbroker::policy::Glob;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, pool) = runtime.block_on(async {
        let url = common::fresh_database().await;
        let store = credbroker::audit::PgAudit::connect(&secrecy::SecretString::from(url.clone()), 2, Duration::from_secs(5)).unwrap();
        credbroker::audit::migrate(store.pool()).await.unwrap();
        (store, PgPool::connect(&url).await.unwrap())
    });
    let cases = (
        prop::collection::vec(glob_piece(), 1..8),
        prop::collection::vec(prop::collection::vec(glob_text(), 8), 0..4),
        prop::collection::vec(glob_text(), 0..4),
    );
    let mut runner = TestRunner::new(Config { cases: 160, failure_persistence: None, ..Config::default() });
    let case = std::cell::Cell::new(0);
    let outcome = runner.run(&cases, |(pieces, fillings, others)| {
        case.set(case.get() + 1);
        let pattern: String = pieces
            .iter()
            .map(|piece| match piece {
                GlobPiece::Char(c) => c.to_string(),
                GlobPiece::Segment => "*".into(),
                GlobPiece::Any => "**".into(),
            })
            .collect();
        // The API trims filter values; a policy pattern is what it is.
        prop_assume!(pattern.trim() == pattern && !pattern.is_empty());
        let filled = fillings.iter().map(|filling| {
            pieces
                .iter()
                .enumerate()
                .map(|(index, piece)| match piece {
                    GlobPiece::Char(c) => c.to_string(),
                    GlobPiece::Segment | GlobPiece::Any => filling[index % filling.len()].clone(),
                })
                .collect::<String>()
        });
        let paths: BTreeSet<String> = filled.chain(others).chain([pattern.clone()]).collect();
        let role = format!("glob-case-{}", case.get());
        let now = time::OffsetDateTime::now_utc();
        let glob = Glob::parse(&pattern);
        let filter = IssuanceFilter::parse([("role", role.as_str()), ("project_path", pattern.as_str()), ("limit", "1000")], now);
        let (glob, filter) = match (glob, filter) {
            (Ok(glob), Ok(filter)) => (glob, filter),
            (Err(_), Err(_)) => return Ok(()),
            (glob, filter) => return Err(TestCaseError::fail(format!("{pattern:?}: the policy says {glob:?}, the audit filter {:?}", filter.err()))),
        };
        let selected = runtime.block_on(async {
            let ids: Vec<Uuid> = paths.iter().map(|_| Uuid::new_v4()).collect();
            let all: Vec<&String> = paths.iter().collect();
            sqlx::query(
                "insert into audit_events (id, occurred_at, request_id, decision, role, project_path)
                 select unnest($1::uuid[]), now(), 'seed', 'denied', $3, unnest($2::text[])",
            )
            .bind(&ids)
            .bind(&all)
            .bind(&role)
            .execute(&pool)
            .await
            .unwrap();
            // Rows show once every older transaction on the cluster has finished.
            let everything = IssuanceFilter::parse([("role", role.as_str()), ("limit", "1000")], now).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.query_issuances(&everything).await.unwrap().items.len() < ids.len() {
                assert!(Instant::now() < deadline, "seeded rows never became visible");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let by_id: std::collections::HashMap<Uuid, String> = ids.into_iter().zip(paths.iter().cloned()).collect();
            let page = store.query_issuances(&filter).await.unwrap();
            page.items.iter().map(|item| by_id[&item.id].clone()).collect::<BTreeSet<String>>()
        });
        let matched: BTreeSet<String> = paths.iter().filter(|path| glob.matches(path)).cloned().collect();
        prop_assert_eq!(&selected, &matched, "pattern {:?}", pattern);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

/// Migration 0021: the fingerprint is looked up through a hash index, and the btree it
/// replaced is gone (it cost every issued row more than any other index; bench/README.md).
#[tokio::test]
async fn a_fingerprint_is_looked_up_through_its_hash_index() {
    let app = spawn().await;
    let mut connection = app.pool.acquire().await.unwrap();
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "select c.relname::text, a.amname::text from pg_index i
         join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam
         join pg_attribute col on col.attrelid = i.indrelid and col.attnum = any(i.indkey)
         where i.indrelid = 'audit_events'::regclass and col.attname = 'credential_sha256'",
    )
    .fetch_all(&mut *connection)
    .await
    .unwrap();
    assert_eq!(indexes, vec![("audit_events_credential_sha256_hash".to_owned(), "hash".to_owned())]);

    // The table is small here, so make a sequential scan the planner's last resort.
    sqlx::query("set enable_seqscan = off").execute(&mut *connection).await.unwrap();
    let plan: Value = sqlx::query_scalar("explain (format json) select id from audit_events where credential_sha256 = $1")
        .bind("a".repeat(64))
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert!(plan.to_string().contains("\"Index Name\":\"audit_events_credential_sha256_hash\""), "{plan}");
}
