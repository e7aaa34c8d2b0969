//! Token-use claims in batches (group commit): one statement answers each claim of a batch
//! claimed, exhausted or frozen, in order, and two replicas claiming the same token at once on
//! one database never exceed its uses, also when each claim carries the issued row it decides.
//! Postgres is real.

mod common;

use std::sync::Arc;
use std::time::Duration;

use credbroker::audit::{Audit, AuditEvent, Decision, PgAudit, TokenUse, UseClaim};
use credbroker::config::AuditWriterConfig;
use credbroker::metrics::Metrics;
use credbroker::types::Claims;
use secrecy::SecretString;
use time::OffsetDateTime;

async fn store() -> PgAudit {
    let url = SecretString::from(common::fresh_database().await);
    let store = PgAudit::connect(&url, 8, Duration::from_secs(5)).unwrap();
    credbroker::audit::migrate(store.pool()).await.unwrap();
    store
}

fn claim(jti: &str, role: &str, max_uses: u32, identities: Option<&[&str]>) -> UseClaim {
    UseClaim {
        issuer: "https://gitlab.example.com".into(),
        jti: jti.into(),
        role: role.into(),
        max_uses,
        token_expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
        unless_frozen_for: identities.map(|identities| identities.iter().map(|identity| identity.to_string()).collect()),
    }
}

fn describe(answer: &TokenUse) -> String {
    match answer {
        TokenUse::Claimed(use_number) => format!("claimed {use_number}"),
        TokenUse::Exhausted => "exhausted".into(),
        TokenUse::Frozen(freeze) => format!("frozen {} {}", freeze.scope, freeze.value),
    }
}

#[tokio::test]
async fn one_statement_answers_each_claim_of_a_batch_in_order() {
    let store = store().await;
    store.freeze("role", "frozen-role", "sec-eve", None).await.unwrap();
    store.freeze("project", "grp/frozen-app", "sec-eve", None).await.unwrap();
    // A use taken before the batch counts against the token.
    assert_eq!(describe(&store.claim_token_use(&claim("t-b", "deploy", 2, Some(&[]))).await.unwrap()), "claimed 1");

    let batch = [
        claim("t-a", "deploy", 2, Some(&["grp/app"])),
        claim("t-a", "deploy", 2, Some(&["grp/app"])),
        claim("t-a", "deploy", 2, Some(&["grp/app"])),
        claim("t-b", "deploy", 2, Some(&["grp/app"])),
        claim("t-b", "deploy", 2, Some(&["grp/app"])),
        claim("t-c", "frozen-role", 5, Some(&["grp/app"])),
        claim("t-d", "deploy", 5, Some(&["grp/other", "grp/frozen-app"])),
        // No freeze check asked (a request's second token): the role's freeze does not apply.
        claim("t-e", "frozen-role", 5, None),
        // Another role is another budget.
        claim("t-a", "deploy-other", 1, Some(&["grp/app"])),
    ];
    let answers: Vec<String> = store.claim_token_uses(&batch).await.unwrap().iter().map(describe).collect();
    assert_eq!(
        answers,
        [
            "claimed 1",
            "claimed 2",
            "exhausted",
            "claimed 2",
            "exhausted",
            "frozen role frozen-role",
            "frozen project grp/frozen-app",
            "claimed 1",
            "claimed 1",
        ]
    );
    // Frozen and exhausted claims took nothing.
    assert_eq!(uses_taken(&store).await, 6);
    // A lifted freeze no longer stops the claim.
    store.unfreeze("role", "frozen-role", "sec-eve").await.unwrap();
    let again = store.claim_token_uses(&[claim("t-c", "frozen-role", 5, Some(&["grp/app"]))]).await.unwrap();
    assert_eq!(describe(&again[0]), "claimed 1");
}

/// An issued row to write with a claim, as the broker does for a credential signed in memory.
fn issued_row() -> AuditEvent {
    let mut row = AuditEvent::new(credbroker::audit::new_row_id(), Decision::Issued, OffsetDateTime::now_utc(), "request");
    row.issuer = Some("https://gitlab.example.com".into());
    row.role = Some("deploy".into());
    row.credential_sha256 = Some("0".repeat(64));
    row.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::minutes(10));
    row
}

async fn issued_ids(store: &PgAudit) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("select id from audit_events where decision = 'issued' order by id").fetch_all(store.pool()).await.unwrap()
}

#[tokio::test]
async fn a_batch_writes_the_rows_of_exactly_the_claims_it_takes() {
    let store = store().await;
    store.freeze("role", "frozen-role", "sec-eve", None).await.unwrap();
    let claims = [
        claim("t-a", "deploy", 1, Some(&["grp/app"])),
        claim("t-a", "deploy", 1, Some(&["grp/app"])),
        claim("t-b", "frozen-role", 5, Some(&["grp/app"])),
        claim("t-c", "deploy", 3, Some(&["grp/app"])),
    ];
    let rows: Vec<AuditEvent> = claims.iter().map(|_| issued_row()).collect();
    let answers = store.claim_token_uses_and_record(&claims.iter().collect::<Vec<_>>(), &rows.iter().collect::<Vec<_>>()).await.unwrap();
    let answers: Vec<String> = answers.iter().map(describe).collect();
    assert_eq!(answers, ["claimed 1", "exhausted", "frozen role frozen-role", "claimed 1"]);
    let mut expected = vec![rows[0].id, rows[3].id];
    expected.sort();
    assert_eq!(issued_ids(&store).await, expected, "a row for each claim taken, none for the others");
    assert_eq!(uses_taken(&store).await, 2);
}

#[tokio::test]
async fn a_lone_claim_writes_its_row_only_when_it_takes_a_use() {
    let store = store().await;
    store.freeze("role", "frozen-role", "sec-eve", None).await.unwrap();
    let (first, replay, frozen) = (issued_row(), issued_row(), issued_row());
    let answers = [
        store.claim_token_use_and_record(&claim("t-a", "deploy", 1, Some(&["grp/app"])), &first).await.unwrap(),
        store.claim_token_use_and_record(&claim("t-a", "deploy", 1, Some(&["grp/app"])), &replay).await.unwrap(),
        store.claim_token_use_and_record(&claim("t-b", "frozen-role", 5, Some(&["grp/app"])), &frozen).await.unwrap(),
    ];
    assert_eq!(answers.iter().map(describe).collect::<Vec<_>>(), ["claimed 1", "exhausted", "frozen role frozen-role"]);
    assert_eq!(issued_ids(&store).await, [first.id]);
    assert_eq!(uses_taken(&store).await, 1);
}

/// Uses taken of every token, for every role.
async fn uses_taken(store: &PgAudit) -> i64 {
    sqlx::query_scalar("select coalesce(sum(uses), 0) from token_use_counts").fetch_one(store.pool()).await.unwrap()
}

fn replica_writer() -> AuditWriterConfig {
    AuditWriterConfig { group_commit: true, writers: 2, batch_max: 64, batch_wait: Duration::from_millis(2), queue_capacity: 1024 }
}

#[tokio::test]
async fn two_replicas_claiming_with_their_rows_write_exactly_the_uses_there_are() {
    let store_url = common::fresh_database().await;
    let replica = |url: String, writer: AuditWriterConfig| async move {
        let store = PgAudit::connect(&SecretString::from(url), 8, Duration::from_secs(5)).unwrap();
        credbroker::audit::migrate(store.pool()).await.unwrap();
        Audit::new(store, writer, 100, Arc::new(Metrics::default()))
    };
    // One replica batches, the other writes each claim on its own: both ways race here.
    let per_request = AuditWriterConfig { group_commit: false, ..replica_writer() };
    let replicas = [replica(store_url.clone(), replica_writer()).await, replica(store_url, per_request).await];
    const MAX_USES: u32 = 23;
    let attempts: Vec<_> = (0..160)
        .map(|attempt| {
            let audit = replicas[attempt % 2].clone();
            let row = issued_row();
            let id = row.id;
            let answer =
                tokio::spawn(async move { audit.claim_and_record(claim("shared", "deploy", MAX_USES, Some(&["grp/app"])), row).await.unwrap().0 });
            (id, answer)
        })
        .collect();
    let mut claimed = Vec::new();
    let mut claimed_ids = Vec::new();
    for (id, answer) in attempts {
        match answer.await.unwrap() {
            TokenUse::Claimed(use_number) => {
                claimed.push(use_number);
                claimed_ids.push(id);
            }
            TokenUse::Exhausted => {}
            TokenUse::Frozen(freeze) => panic!("no freeze was set: {freeze:?}"),
        }
    }
    claimed.sort_unstable();
    claimed_ids.sort();
    assert_eq!(claimed, (1..=MAX_USES).collect::<Vec<_>>(), "each use exactly once");
    assert_eq!(issued_ids(replicas[0].store()).await, claimed_ids, "an issued row for each use taken, and only for those");
}

#[tokio::test]
async fn two_replicas_claiming_one_token_at_once_never_exceed_its_uses() {
    let store_url = common::fresh_database().await;
    let replica = |url: String| async move {
        let store = PgAudit::connect(&SecretString::from(url), 8, Duration::from_secs(5)).unwrap();
        credbroker::audit::migrate(store.pool()).await.unwrap();
        Audit::new(store, replica_writer(), 100, Arc::new(Metrics::default()))
    };
    let replicas = [replica(store_url.clone()).await, replica(store_url).await];
    const MAX_USES: u32 = 37;
    let claims: Vec<_> = (0..240)
        .map(|attempt| {
            let audit = replicas[attempt % 2].clone();
            tokio::spawn(async move { audit.claim_token_use(claim("shared", "deploy", MAX_USES, Some(&["grp/app"]))).await.unwrap() })
        })
        .collect();
    let mut claimed = Vec::new();
    let mut exhausted = 0;
    for claim in claims {
        match claim.await.unwrap() {
            TokenUse::Claimed(use_number) => claimed.push(use_number),
            TokenUse::Exhausted => exhausted += 1,
            TokenUse::Frozen(freeze) => panic!("no freeze was set: {freeze:?}"),
        }
    }
    claimed.sort_unstable();
    assert_eq!(claimed, (1..=MAX_USES).collect::<Vec<_>>(), "each use exactly once");
    assert_eq!(exhausted, 240 - MAX_USES as usize);
    assert_eq!(uses_taken(replicas[0].store()).await, i64::from(MAX_USES));
}

/// Uses recorded one row per use before migration 0019 become each token's count: a token
/// used up before the upgrade stays used up after it, and one with uses left goes on counting.
#[tokio::test]
async fn the_migration_counts_the_uses_already_taken() {
    let url = common::fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut before = sqlx::migrate::Migrator::new(common::repo_path("migrations")).await.unwrap();
    before.migrations = before.migrations.iter().filter(|migration| migration.version < 19).cloned().collect::<Vec<_>>().into();
    before.run(&pool).await.unwrap();
    sqlx::query(
        "insert into token_uses (issuer, jti, role, use_number, token_expires_at)
         select 'https://gitlab.example.com', jti, 'deploy', n, now() + interval '1 hour'
         from (values ('used-up', 2), ('one-left', 1)) as t (jti, taken), generate_series(1, t.taken) n",
    )
    .execute(&pool)
    .await
    .unwrap();
    credbroker::audit::migrate(&pool).await.unwrap();

    let store = PgAudit::connect(&SecretString::from(url), 2, Duration::from_secs(5)).unwrap();
    let answers = store.claim_token_uses(&[claim("used-up", "deploy", 2, None), claim("one-left", "deploy", 2, None)]).await.unwrap();
    assert_eq!(answers.iter().map(describe).collect::<Vec<_>>(), ["exhausted", "claimed 2"]);
    assert_eq!(uses_taken(&store).await, 4);
}

/// A lone row goes in by a statement of its own, one parameter per column; a batch by one
/// array per column. Both must store every column alike, with a claim's row or without.
#[tokio::test]
async fn a_row_written_alone_is_stored_as_the_same_row_written_in_a_batch() {
    let store = store().await;
    let occurred_at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let claims = serde_json::json!({
        "project_path": "grp/app", "job_project_path": "grp/app", "namespace_path": "grp",
        "pipeline_id": "12", "job_id": 34, "ref": "main", "ref_type": "branch", "sha": "0123abcd",
        "user_login": "ada\u{0}lovelace", "environment": "prod", "runner_id": 56,
        "nested": {"list": [1, "two", null], "é": true}
    });
    let row = |id: uuid::Uuid| {
        let mut event = AuditEvent::new(id, Decision::Issued, occurred_at, "request-1");
        event.code = Some("code".into());
        event.detail = Some("detail".into());
        event.issuer = Some("https://gitlab.example.com".into());
        event.subject = Some("project_path:grp/app:ref_type:branch:ref:main".into());
        event.job_token_sha256 = Some("a".repeat(64));
        event.claims = Some(Arc::new(claims.as_object().unwrap().clone().into()));
        event.role = Some("deploy".into());
        event.target = Some("kafka".into());
        event.backend = Some("kafka_oauth".into());
        event.requested_ttl_seconds = Some(600);
        event.granted_ttl_seconds = Some(300);
        event.expires_at = Some(occurred_at + time::Duration::minutes(5));
        event.job_deadline = Some(occurred_at + time::Duration::hours(1));
        event.client_addr = Some("192.0.2.7".into());
        event.user_agent = Some("credbroker-cli/1".into());
        event.credential_sha256 = Some("b".repeat(64));
        event.credential_handle = Some("lease/1".into());
        event.occurrences = 3;
        event.overshoot_seconds = Some(7);
        event.renews_issuance = Some(uuid::Uuid::from_u128(1));
        event.about_issuance = Some(uuid::Uuid::from_u128(2));
        event.endpoint = Some("credentials");
        event.policy_version = Some("v1".into());
        event
    };
    let ids: Vec<uuid::Uuid> = (10..16).map(uuid::Uuid::from_u128).collect();
    store.write(&row(ids[0])).await.unwrap();
    store.write_batch(&[row(ids[1]), row(ids[2])]).await.unwrap();
    let answer = store.claim_token_use_and_record(&claim("t-alone", "deploy", 1, Some(&["grp/app"])), &row(ids[3])).await.unwrap();
    assert_eq!(describe(&answer), "claimed 1");
    let claims = [claim("t-batch-1", "deploy", 1, Some(&["grp/app"])), claim("t-batch-2", "deploy", 1, None)];
    let rows = [row(ids[4]), row(ids[5])];
    let answers = store.claim_token_uses_and_record(&claims.iter().collect::<Vec<_>>(), &rows.iter().collect::<Vec<_>>()).await.unwrap();
    assert_eq!(answers.iter().map(describe).collect::<Vec<_>>(), ["claimed 1", "claimed 1"]);

    // Every column but those Postgres sets itself, whatever columns later migrations add.
    let stored: Vec<(uuid::Uuid, serde_json::Value)> =
        sqlx::query_as("select id, to_jsonb(a) - 'id' - 'recorded_at' - 'tx' from audit_events a where id = any($1) order by id")
            .bind(&ids)
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(stored.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids, "every row written");
    let alone = &stored[0].1;
    assert_eq!(alone["runner_id"], 56, "{alone}");
    assert_eq!(alone["claims_json"]["user_login"], "ada\u{FFFD}lovelace", "{alone}");
    assert_eq!(alone["claims"], serde_json::Value::Null, "jsonb only in rows written before migration 0023");
    assert_eq!(alone["renews_issuance_id"], uuid::Uuid::from_u128(1).to_string(), "{alone}");
    for (id, columns) in &stored[1..] {
        assert_eq!(columns, alone, "row {id}");
    }
}

/// A row stores the job token's claims as the token's own JSON text while nothing has been
/// added to them and Postgres reads that text as serde_json did. Alone or in a batch, it must
/// read back as the claims the broker parsed and decided on: a repeated name keeps its last
/// value in both. Text Postgres would read otherwise, or refuse, is written field by field, so
/// a signed token cannot fail its batch: a NUL becomes U+FFFD, and an exponent jsonb's numeric
/// refuses (`1e-20000`) is written as serde_json read it.
#[tokio::test]
async fn claims_stored_as_the_token_sent_them_read_back_as_the_claims_the_broker_parsed() {
    let store = store().await;
    let received = r#"{"project_path":"grp/app","ref":"evil","ref":"main","name":"été 😀 \/",
        "nested":{"list":[1,"two",null,-7,true]},"exp":1800000000}"#;
    let parsed = Claims::parse(received.as_bytes().to_vec()).unwrap();
    assert_eq!(parsed.received_json(), Some(received));
    assert_eq!(parsed.get("ref").unwrap(), "main", "a repeated name keeps its last value");
    assert_eq!(parsed.fields()["ref"], "main", "serde_json keeps a repeated name's last value");
    let row = |id: u128, claims: Claims| {
        let mut event = AuditEvent::new(uuid::Uuid::from_u128(id), Decision::Denied, OffsetDateTime::now_utc(), "request-1");
        event.claims = Some(Arc::new(claims));
        event
    };
    let written_out = Claims::from(parsed.fields().clone());
    store.write(&row(1, written_out)).await.unwrap();
    store.write(&row(2, parsed.clone())).await.unwrap();
    store.write_batch(&[row(3, parsed.clone()), row(4, parsed.clone())]).await.unwrap();
    let refused_by_jsonb = [br#"{"user_login":"ada\u0000lovelace"}"#.as_slice(), br#"{"n":1e-20000}"#, br#"{"n":1e400000}"#];
    let refused_by_jsonb: Vec<Claims> = refused_by_jsonb.iter().filter_map(|sent| Claims::parse(sent.to_vec()).ok()).collect();
    assert_eq!(refused_by_jsonb.len(), 2, "serde_json refuses 1e400000 itself, so no token carries it this far");
    store.write_batch(&[row(5, refused_by_jsonb[0].clone()), row(6, refused_by_jsonb[1].clone())]).await.unwrap();

    // Read as every read and the seal read them: parsed as jsonb (migration 0023).
    let stored: Vec<(uuid::Uuid, serde_json::Value, String, serde_json::Value)> = sqlx::query_as(
        "select a.id, coalesce(a.claims_json::jsonb, a.claims), a.claims_json::text, to_jsonb(a) -> 'claims_json'
         from audit_events a where a.id = any($1) order by a.id",
    )
    .bind((1..=6).map(uuid::Uuid::from_u128).collect::<Vec<_>>())
    .fetch_all(store.pool())
    .await
    .unwrap();
    let claims: Vec<&serde_json::Value> = stored.iter().map(|(_, claims, _, _)| claims).collect();
    for (id, claims, _, sealed) in &stored {
        assert_eq!(sealed, claims, "row {id}: the seal's content holds the claims as read");
    }
    for (id, _, text, _) in &stored[1..4] {
        assert_eq!(text, received, "row {id}: the token's own text, repeated name and all");
    }
    assert_eq!(claims[0], &serde_json::Value::Object(parsed.fields().clone()), "written out field by field");
    assert_eq!(claims[0]["ref"], "main");
    assert_eq!(claims[0]["name"], "été 😀 /");
    for (at, stored) in claims.iter().enumerate().take(4).skip(1) {
        assert_eq!(stored, &claims[0], "row {} (the token's text) against row 1 (the fields written out)", at + 1);
    }
    assert_eq!(claims[4]["user_login"], "ada\u{FFFD}lovelace");
    assert_eq!(claims[5]["n"], 0.0);
}
