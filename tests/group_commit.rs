//! The group-commit audit writer: many decisions per commit, and never an answer before the
//! row it depends on is durable. Postgres is real; batches are held up with a real table lock
//! and killed with a real backend termination.

mod common;

use std::time::Duration;

use common::TestApp;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

/// Holds a lock that blocks every INSERT into audit_events until dropped (or committed).
async fn block_audit_inserts(database_url: &str) -> PgConnection {
    let mut connection = PgConnection::connect(database_url).await.unwrap();
    sqlx::query("begin").execute(&mut connection).await.unwrap();
    sqlx::query("lock table audit_events in exclusive mode").execute(&mut connection).await.unwrap();
    connection
}

/// The backends of audit INSERTs (batches, alone or with their claims, and a lone exchange's
/// claim with its row) stuck behind the lock. A claim's statement shows only its start:
/// pg_stat_activity cuts it before its INSERT.
async fn stuck_batches(app: &TestApp) -> Vec<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock'
           and (query like 'insert into audit_events%' or query like 'with request as%' or query like 'with claimed as%')",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// Waits until at least `at_least` batches are stuck behind the lock.
async fn blocked_batches(app: &TestApp, at_least: usize) {
    for _ in 0..200 {
        if stuck_batches(app).await.len() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no audit batch ever waited on the lock");
}

async fn exchange_all(app: &TestApp, count: usize) -> Vec<tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap, Value)>> {
    (0..count)
        .map(|_| {
            let client = app.client.clone();
            let url = format!("{}/v1/credentials", app.url);
            let token = app.issuer.token();
            tokio::spawn(async move {
                let response = client.post(url).bearer_auth(token).json(&json!({"role": "orders-producer"})).send().await.unwrap();
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                (status, headers, response.json().await.unwrap_or(Value::Null))
            })
        })
        .collect()
}

async fn issued_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap()
}

#[tokio::test]
async fn no_credential_is_answered_before_its_batch_commits() {
    let app = TestApp::spawn().await;
    let lock = block_audit_inserts(&app.database_url).await;
    let requests = exchange_all(&app, 24).await;
    blocked_batches(&app, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(requests.iter().all(|request| !request.is_finished()), "a response left before its row was committed");
    assert_eq!(issued_rows(&app).await, 0);

    lock.close().await.unwrap(); // ends the transaction, releasing the lock
    let mut issuance_ids = Vec::new();
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        issuance_ids.push(body["issuance_id"].as_str().unwrap().to_owned());
    }
    for id in &issuance_ids {
        assert_eq!(app.audit_row(id).await["decision"], "issued");
    }
    // Rows written in one transaction share its xmin: fewer transactions than rows proves grouping.
    let transactions: i64 =
        sqlx::query_scalar("select count(distinct xmin::text) from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert!(transactions < 24, "24 rows in {transactions} transactions: not grouped");
}

#[tokio::test]
async fn a_batch_killed_mid_commit_fails_every_request_in_it() {
    let app = TestApp::spawn().await;
    let lock = block_audit_inserts(&app.database_url).await;
    let requests = exchange_all(&app, 20).await;
    blocked_batches(&app, 1).await;
    // Kill the database side of every batch in flight, as a crash of its backend would, until
    // every request has its answer. The lock stays held, so no batch can commit meanwhile.
    let mut killed = 0;
    while !requests.iter().all(|request| request.is_finished()) {
        for pid in stuck_batches(&app).await {
            sqlx::query("select pg_terminate_backend($1)").bind(pid).execute(&app.pool).await.unwrap();
            killed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed >= 1);

    let mut failed_ids = Vec::new();
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "audit_unavailable");
        assert!(body.get("credential").is_none(), "a failed request carried a credential: {body}");
        failed_ids.push(uuid::Uuid::parse_str(body["issuance_id"].as_str().unwrap()).unwrap());
    }
    lock.close().await.unwrap();
    let recorded: i64 =
        sqlx::query_scalar("select count(*) from audit_events where id = any($1)").bind(&failed_ids).fetch_one(&app.pool).await.unwrap();
    assert_eq!(recorded, 0, "a request that failed has a committed row");

    // The writer reconnects by itself.
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(issued_rows(&app).await, 1);
}

/// The writers keep their connections between batches (src/audit/held.rs). One that died
/// while the broker was idle (Postgres restarted, a backend killed) is found out by the ping
/// it gets after a second idle, and replaced: the next exchange succeeds.
#[tokio::test]
async fn connections_that_died_while_idle_are_replaced_before_the_next_exchange() {
    let app = TestApp::spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and application_name = 'credbroker' and pid <> pg_backend_pid()",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(killed.iter().filter(|ended| **ended).count() >= 2, "the claim's and the row's connections: {killed:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..3 {
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(issued_rows(&app).await, 4);
}

#[tokio::test]
async fn a_full_queue_refuses_early_with_rate_limited_and_counts_every_refusal() {
    let app = TestApp::spawn_with("audit_queue_capacity = 3\naudit_writers = 1\naudit_batch_max = 2", None).await;
    let lock = block_audit_inserts(&app.database_url).await;
    let requests = exchange_all(&app, 30).await;
    blocked_batches(&app, 1).await;
    // With the database stuck, refusals must still come back at once.
    let mut refused = 0;
    for request in requests {
        if let Ok(Ok((status, headers, body))) = tokio::time::timeout(Duration::from_millis(500), request).await {
            assert_eq!(status, 429, "{body}");
            assert_eq!(body["code"], "rate_limited");
            assert_eq!(headers["retry-after"], "1");
            assert!(body.get("credential").is_none());
            refused += 1;
        }
    }
    assert!(refused > 0, "30 requests fit a queue of 3");
    lock.close().await.unwrap();

    // The rest complete once the database moves again; the refusals become one aggregated row.
    let mut attempts = 0;
    while issued_rows(&app).await < (30 - refused) as i64 && attempts < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        attempts += 1;
    }
    assert_eq!(issued_rows(&app).await, (30 - refused) as i64);
    app.state.broker.audit.flush_unattributed().await.unwrap();
    let (code, occurrences): (String, i32) =
        sqlx::query_as("select code, occurrences from audit_events where request_id = 'aggregated'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(code, "rate_limited");
    assert_eq!(occurrences, refused, "every refusal is counted");
}

#[tokio::test]
async fn one_insert_per_request_mode_still_records_every_decision() {
    let app = TestApp::spawn_with("audit_group_commit = false", None).await;
    let requests = exchange_all(&app, 8).await;
    for request in requests {
        assert_eq!(request.await.unwrap().0, 200);
    }
    let transactions: i64 =
        sqlx::query_scalar("select count(distinct xmin::text) from audit_events where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(transactions, 8, "one transaction per row");
}
