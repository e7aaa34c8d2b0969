//! The `/audit` page's chart on real Postgres with the real broker (issue 18). Unfiltered, it
//! is read from migration 0018's rollup `audit_timeline`, which counts the rows below
//! `counted_below` (migration 0022: brokers count rows into it once they are below the
//! transaction horizon), plus the rows not counted yet, read from the log in the same
//! snapshot; filtered by anything else, from the rows. Checked against a count of the rows
//! themselves, made here in Rust: rows written by the group-commit writers of two brokers on
//! one database at once, both running as `credbroker_broker`, with the rollup counting
//! meanwhile and not; the page's own chart; rows that were there before the migrations; and
//! rows that leave with an archive, counted in the rollup or not yet. And how far behind the
//! rollup is, as `/metrics` says.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{rsa_pem, TestApp, POLICIES};
use credbroker::audit::query::{IssuanceFilter, Timeline, TIMELINE_GRAIN};
use credbroker::audit::{AuditEvent, Decision, PgAudit};
use credbroker::signing::SigningKey;
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use time::macros::datetime;
use time::OffsetDateTime;
use uuid::Uuid;

/// (bucket start, target, decision) → events, as a chart says or as the rows say.
type Counts = BTreeMap<(OffsetDateTime, String, String), i64>;

/// What a chart holds.
fn charted(timeline: &Timeline) -> Counts {
    let mut counts = Counts::new();
    for point in &timeline.points {
        assert!(point.events > 0, "an empty bucket is listed: {point:?}");
        let previous = counts.insert((point.start, point.target.clone(), point.decision.clone()), point.events);
        assert!(previous.is_none(), "a bucket is listed twice: {point:?}");
    }
    counts
}

/// One audit row as stored, for counting.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Stored {
    occurred_at: OffsetDateTime,
    target: Option<String>,
    decision: String,
    occurrences: i32,
}

async fn stored(pool: &PgPool) -> Vec<Stored> {
    sqlx::query_as("select occurred_at, target, decision, occurrences from audit_events").fetch_all(pool).await.unwrap()
}

/// What the chart must say for these rows: issued and denied rows in its window, in buckets
/// counted from its start, each row counting its occurrences; `keep` is the rest of the filter.
fn counted(rows: &[Stored], timeline: &Timeline, keep: impl Fn(&Stored) -> bool) -> Counts {
    let bucket = time::Duration::seconds(timeline.bucket_seconds);
    let mut counts = Counts::new();
    for row in rows.iter().filter(|row| ["issued", "denied"].contains(&row.decision.as_str()) && keep(row)) {
        if row.occurred_at < timeline.since || row.occurred_at >= timeline.until {
            continue;
        }
        let start = timeline.since + bucket * ((row.occurred_at - timeline.since).whole_microseconds() / bucket.whole_microseconds()) as i32;
        let key = (start, row.target.clone().unwrap_or_default(), row.decision.clone());
        *counts.entry(key).or_default() += i64::from(row.occurrences);
    }
    counts
}

fn filter(pairs: &[(&str, &str)], now: OffsetDateTime) -> IssuanceFilter {
    IssuanceFilter::parse(pairs.iter().copied(), now).unwrap()
}

fn on_grain(at: OffsetDateTime) -> bool {
    at.unix_timestamp() % TIMELINE_GRAIN.whole_seconds() == 0 && at.nanosecond() == 0
}

/// A 10-minute boundary three days back: `events` puts a row on it and one a second before.
fn edge(now: OffsetDateTime) -> OffsetDateTime {
    let back = (now - time::Duration::days(3)).unix_timestamp();
    OffsetDateTime::from_unix_timestamp(back - back % TIMELINE_GRAIN.whole_seconds()).unwrap()
}

/// A mix like a busy day's: every decision, four targets and none, aggregated denials
/// (`occurrences` > 1), over the last 8 days so some fall outside the default 7, and two rows
/// either side of [`edge`].
fn events(replica: usize, count: usize, now: OffsetDateTime) -> Vec<AuditEvent> {
    let now = now.replace_nanosecond(0).unwrap();
    let decisions =
        [Decision::Issued, Decision::Issued, Decision::Denied, Decision::Failed, Decision::Revoked, Decision::Issued, Decision::AuditRead];
    let targets = [Some("kafka"), Some("aws"), Some("vault"), Some("snowflake"), None];
    (0..count)
        .map(|n| {
            let seed = replica * 100_003 + n;
            let at = match n {
                0 => edge(now),
                1 => edge(now) - time::Duration::seconds(1),
                _ => now - time::Duration::seconds((seed as i64 * 7_919) % (8 * 86_400)),
            };
            let decision = decisions[seed % decisions.len()];
            let mut event = AuditEvent::new(Uuid::new_v4(), decision, at, &format!("timeline-{replica}-{n}"));
            event.target = targets[(seed / 3) % targets.len()].map(str::to_owned);
            event.backend = event.target.clone();
            event.issuer = Some("gitlab".into());
            let mut claims = Map::new();
            claims.insert("project_path".into(), json!("platform/orders"));
            event.claims = Some(std::sync::Arc::new(claims.into()));
            if decision == Decision::Issued {
                event.credential_sha256 = Some(format!("{:064x}", seed));
                event.expires_at = Some(at + time::Duration::minutes(15));
            }
            if decision == Decision::Denied && seed % 4 == 0 {
                event.occurrences = 1 + (seed % 7) as u32;
            }
            event
        })
        .collect()
}

/// Writes every event through the broker's own writer (group commit), all at once.
fn write_all(app: &TestApp, events: Vec<AuditEvent>) -> Vec<tokio::task::JoinHandle<()>> {
    events
        .into_iter()
        .map(|event| {
            let audit = app.state.broker.audit.clone();
            tokio::spawn(async move { audit.record(event).await.unwrap() })
        })
        .collect()
}

/// A new login in `role` (a cluster role of migration 0010), as a URL of the owner's database.
async fn login_in(role: &str, owner: &PgPool, owner_url: &str) -> String {
    let login = format!("{role}_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("create role {login} login in role {role}")).execute(owner).await.unwrap();
    let (base, database) = owner_url.rsplit_once('/').unwrap();
    format!("{}/{database}", base.replacen("postgres@", &format!("{login}@"), 1))
}

/// A fresh database migrated by its owner, and a login in `role` on it.
async fn database_with_login(role: &str) -> (String, PgPool, String) {
    let owner_url = common::fresh_database().await;
    let owner = PgPool::connect(&owner_url).await.unwrap();
    credbroker::audit::migrate(&owner).await.unwrap();
    let login_url = login_in(role, &owner, &owner_url).await;
    (owner_url, owner, login_url)
}

const AUDITOR_PROJECT: &str = "security/audit";

fn auditor_policies() -> String {
    format!("[auditors]\nissuer = \"gitlab\"\n[auditors.claims]\nproject_path = \"{AUDITOR_PROJECT}\"\n\n{POLICIES}")
}

/// Two brokers on one database, both logged in as `credbroker_broker`; and the owner's pool.
async fn two_brokers() -> (PgPool, TestApp, TestApp) {
    let (_, owner, broker_url) = database_with_login("credbroker_broker").await;
    let first = TestApp::spawn_full("migrate_on_start = false", "", POLICIES, Some(broker_url.clone())).await;
    let second = TestApp::spawn_full("migrate_on_start = false", "", POLICIES, Some(broker_url)).await;
    (owner, first, second)
}

/// Rows of the log the rollup does not count yet.
async fn not_counted(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from audit_events where tx >= (select counted_below from audit_timeline_progress)")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Catches the rollup up until it counts every row of the log (other tests' transactions on
/// the cluster hold the horizon back a moment, and a broker's own catch-up may be running).
async fn count_everything(store: &PgAudit, pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        store.catch_up_timeline().await.unwrap();
        if not_counted(pool).await == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the rollup never counted every row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_brokers_writing_batches_at_once_chart_exactly_what_they_wrote() {
    let (owner, first, second) = two_brokers().await;
    let now = OffsetDateTime::now_utc();
    let mut writing = write_all(&first, events(1, 700, now));
    writing.extend(write_all(&second, events(2, 700, now)));
    // Real exchanges too, issued and denied (a role whose claims do not match), on both.
    for app in [&first, &second] {
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
        assert_eq!(status, 200, "{body}");
        let strict = app.issuer.token_with(json!({"job_project_path": "other/project"}));
        let (status, _, body) = app.exchange(&strict, json!({"role": "orders-producer"})).await;
        assert_eq!(status, 403, "{body}");
    }
    for task in writing {
        task.await.unwrap();
    }
    let rows = stored(&owner).await;
    assert_eq!(rows.len(), 1404);
    // Grouped into batches.
    let transactions: i64 = sqlx::query_scalar("select count(distinct tx) from audit_events").fetch_one(&owner).await.unwrap();
    assert!(transactions < 700, "1404 rows in {transactions} transactions: not batched");

    let store = first.state.broker.audit.store();
    let now = OffsetDateTime::now_utc();
    let all = |_: &Stored| true;
    // Whatever the rollup counts by now, the chart adds the rest; counted, it says the same.
    let before_counting = store.issuance_timeline(&filter(&[], now), now).await.unwrap();
    assert_eq!(charted(&before_counting), counted(&rows, &before_counting, all));
    count_everything(store, &owner).await;
    // The page's default view: everything, the last 7 days, in 6-hour buckets.
    let default = store.issuance_timeline(&filter(&[], now), now).await.unwrap();
    assert_eq!(default.bucket_seconds, 6 * 3600);
    assert!(on_grain(default.since) && on_grain(default.until), "{} .. {}", default.since, default.until);
    assert!(default.until >= now && default.until - now < TIMELINE_GRAIN);
    assert_eq!(default.until - default.since, time::Duration::days(7) + if on_grain(now) { time::Duration::ZERO } else { TIMELINE_GRAIN });
    let expected = counted(&rows, &default, all);
    assert!(expected.len() > 50 && expected.keys().any(|(_, target, _)| target.is_empty()), "{expected:?}");
    assert_eq!(charted(&default), expected);

    // Time, decision and target are in the rollup too, at other bucket widths and windows.
    let kafka_denied = store.issuance_timeline(&filter(&[("decision", "denied"), ("target", "kafka"), ("since", "1d")], now), now).await.unwrap();
    assert_eq!(kafka_denied.bucket_seconds, 3600);
    let expected = counted(&rows, &kafka_denied, |row| row.decision == "denied" && row.target.as_deref() == Some("kafka"));
    assert!(!expected.is_empty());
    assert_eq!(charted(&kafka_denied), expected);
    // A window inside 10-minute boundaries is widened to them: from the edge row on, not the
    // row a second before it.
    let (since, until) = (edge(now) + time::Duration::seconds(123), now - time::Duration::seconds(86_400 + 7));
    let rfc3339 = |at: OffsetDateTime| at.format(&time::format_description::well_known::Rfc3339).unwrap();
    let window = store.issuance_timeline(&filter(&[("since", &rfc3339(since)), ("until", &rfc3339(until))], now), now).await.unwrap();
    assert_eq!(window.since, edge(now));
    assert!(window.until >= until && window.until - until < TIMELINE_GRAIN && on_grain(window.until));
    let expected = counted(&rows, &window, all);
    assert!(
        rows.iter().any(|row| row.occurred_at == window.since) && rows.iter().any(|row| row.occurred_at == window.since - time::Duration::seconds(1))
    );
    assert_eq!(charted(&window), expected);

    // Any other filter counts the rows themselves, below the transaction horizon (which other
    // tests' transactions on the cluster may hold back a moment). Every row here is
    // platform/orders', so the two paths must agree.
    let by_project = filter(&[("project_path", "platform/orders")], now);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let from_rows = store.issuance_timeline(&by_project, now).await.unwrap();
        if charted(&from_rows) == charted(&default) {
            assert_eq!((from_rows.since, from_rows.until, from_rows.bucket_seconds), (default.since, default.until, default.bucket_seconds));
            break;
        }
        assert!(Instant::now() < deadline, "the chart from the rows never matched the rollup's");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rollup counts rows while two brokers write them, with the chart read meanwhile: no
/// count is lost or doubled, whether a row is counted in the rollup or read from the log, and
/// the rollup ends with one row per bucket, target and decision.
#[tokio::test]
async fn counting_while_two_brokers_write_keeps_every_count() {
    let (owner, first, second) = two_brokers().await;
    let store = first.state.broker.audit.store().clone();
    let now = OffsetDateTime::now_utc();
    let mut writing = write_all(&first, events(4, 600, now));
    writing.extend(write_all(&second, events(5, 600, now)));
    let counting = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                store.catch_up_timeline().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for task in writing {
        task.await.unwrap();
    }
    counting.await.unwrap();
    let rows = stored(&owner).await;
    assert_eq!(rows.len(), 1200);
    let default = store.issuance_timeline(&filter(&[], now), now).await.unwrap();
    assert_eq!(charted(&default), counted(&rows, &default, |_| true));

    count_everything(&store, &owner).await;
    let counted_rows: i64 = sqlx::query_scalar("select sum(events)::bigint from audit_timeline").fetch_one(&owner).await.unwrap();
    let issued_or_denied: i64 =
        rows.iter().filter(|row| ["issued", "denied"].contains(&row.decision.as_str())).map(|row| i64::from(row.occurrences)).sum();
    assert_eq!(counted_rows, issued_or_denied, "the rollup alone counts every row now");
    let (keys, spread): (i64, i64) =
        sqlx::query_as("select count(distinct (bucket_start, target, decision)), count(*) filter (where writer <> 0) from audit_timeline")
            .fetch_one(&owner)
            .await
            .unwrap();
    let rollup_rows: i64 = sqlx::query_scalar("select count(*) from audit_timeline").fetch_one(&owner).await.unwrap();
    assert_eq!((rollup_rows, spread), (keys, 0));
    let week = store.issuance_timeline(&filter(&[("since", "8d")], now), now).await.unwrap();
    assert_eq!(charted(&week), counted(&rows, &week, |_| true));

    // Rows written after it: counted in part by the rollup, in part from the log.
    for task in write_all(&second, events(6, 300, now)) {
        task.await.unwrap();
    }
    let rows = stored(&owner).await;
    let default = store.issuance_timeline(&filter(&[], now), now).await.unwrap();
    assert_eq!(charted(&default), counted(&rows, &default, |_| true));
}

#[tokio::test]
async fn the_unfiltered_page_draws_its_chart_from_the_rollup() {
    let app = TestApp::spawn_full("", "", &auditor_policies(), None).await;
    let now = OffsetDateTime::now_utc();
    for task in write_all(&app, events(3, 300, now)) {
        task.await.unwrap();
    }
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    let token = app.issuer.token_with(json!({"project_path": AUDITOR_PROJECT, "user_login": "sec-eve"}));
    let response = app.client.get(format!("{}/audit", app.url)).header("cookie", format!("credbroker_audit={token}")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let page = response.text().await.unwrap();
    let data = page.split(r#"<script type="application/json" id="timeline-data">"#).nth(1).unwrap().split("</script>").next().unwrap();
    let data: Value = serde_json::from_str(data).unwrap();
    let timeline: Timeline = Timeline {
        since: OffsetDateTime::parse(data["since"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap(),
        until: OffsetDateTime::parse(data["until"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap(),
        bucket_seconds: data["bucket_seconds"].as_i64().unwrap(),
        points: Vec::new(),
    };
    assert!(on_grain(timeline.since) && on_grain(timeline.until) && timeline.bucket_seconds == 6 * 3600, "{data}");
    let mut shown = Counts::new();
    for point in data["points"].as_array().unwrap() {
        let start = OffsetDateTime::parse(point["start"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
        let key = (start, point["target"].as_str().unwrap().to_owned(), point["decision"].as_str().unwrap().to_owned());
        shown.insert(key, point["events"].as_i64().unwrap());
    }
    let rows = stored(&app.pool).await;
    let expected = counted(&rows, &timeline, |_| true);
    assert!(expected.keys().any(|(_, target, decision)| target == "kafka" && decision == "issued"));
    assert_eq!(shown, expected);
    // The window the page prints is the one the chart counts.
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    let printed = format!("{} to {}", timeline.since.format(&format).unwrap(), timeline.until.format(&format).unwrap());
    assert!(page.contains(&printed) && page.contains(r#"<canvas id="timeline""#), "{printed}: {page}");
}

/// Rows older than migration 0018 are counted by the migrations themselves.
#[tokio::test]
async fn the_migration_counts_the_rows_already_there() {
    let url = common::fresh_database().await;
    let pool = PgPool::connect(&url).await.unwrap();
    let mut before = sqlx::migrate::Migrator::new(common::repo_path("migrations")).await.unwrap();
    before.migrations = before.migrations.iter().filter(|migration| migration.version < 18).cloned().collect::<Vec<_>>().into();
    before.run(&pool).await.unwrap();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, target, occurrences, credential_sha256, expires_at)
         select gen_random_uuid(), now() - make_interval(secs => (i * 7919) % (8 * 86400)), 'before-0018',
                (array['issued', 'denied', 'failed', 'revoked', 'audit_read'])[i % 5 + 1],
                (array['kafka', 'aws', null])[i % 3 + 1], 1 + i % 4 * (i % 2), 'c', now()
         from generate_series(1, 3000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    credbroker::audit::migrate(&pool).await.unwrap();

    let store = PgAudit::connect(&secrecy::SecretString::from(url), 2, Duration::from_secs(5)).unwrap();
    let now = OffsetDateTime::now_utc();
    let rows = stored(&pool).await;
    let cases: [&[(&str, &str)]; 4] = [&[], &[("since", "30d")], &[("since", "2h")], &[("decision", "issued"), ("target", "aws")]];
    for pairs in cases {
        let timeline = store.issuance_timeline(&filter(pairs, now), now).await.unwrap();
        let expected = counted(&rows, &timeline, |row| {
            pairs.iter().all(|(name, value)| match *name {
                "decision" => row.decision == *value,
                "target" => row.target.as_deref() == Some(*value),
                _ => true,
            })
        });
        assert!(!expected.is_empty(), "{pairs:?}");
        assert_eq!(charted(&timeline), expected, "{pairs:?}");
    }
    let writers: Vec<i32> = sqlx::query_scalar("select distinct writer from audit_timeline").fetch_all(&pool).await.unwrap();
    assert_eq!(writers, vec![0], "the backfill is writer 0's");
}

/// Archiving (migration 0013's `audit_archive()`) takes the counts of the rows it removes,
/// including a 10-minute bucket it splits: one row archived, one kept. Three of the archived
/// rows are counted in the rollup when they leave, one is not yet.
#[tokio::test]
async fn archived_rows_leave_the_chart_with_their_counts() {
    let url = common::fresh_database().await;
    let store = PgAudit::connect(&secrecy::SecretString::from(url.clone()), 4, Duration::from_secs(5)).unwrap();
    credbroker::audit::migrate(store.pool()).await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    // One transaction each, in this order, sealed two per checkpoint: checkpoints 1 and 2 hold
    // only January's rows and are archived by a cut on February 1st; checkpoint 3 holds a
    // February row, so its late January row (same 10 minutes as the last archived one) stays.
    let rows = [
        (datetime!(2024-01-31 10:00 UTC), "issued", Some("kafka"), 1),
        (datetime!(2024-01-31 10:01 UTC), "denied", None, 5),
        (datetime!(2024-01-31 23:51 UTC), "issued", Some("kafka"), 1),
        (datetime!(2024-01-31 23:52 UTC), "denied", Some("kafka"), 3),
        (datetime!(2024-02-01 00:30 UTC), "issued", Some("kafka"), 1),
        (datetime!(2024-01-31 23:53 UTC), "denied", Some("kafka"), 2),
    ];
    for (n, (at, decision, target, occurrences)) in rows.into_iter().enumerate() {
        if n == 3 {
            count_everything(&store, &pool).await;
        }
        sqlx::query(
            "insert into audit_events (id, occurred_at, request_id, decision, target, occurrences, credential_sha256, expires_at)
             values ($1, $2, 'archive', $3, $4, $5, 'c', $2)",
        )
        .bind(Uuid::new_v4())
        .bind(at)
        .bind(decision)
        .bind(target)
        .bind(occurrences)
        .execute(&pool)
        .await
        .unwrap();
    }
    let key = SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sealed = 0;
    while sealed < rows.len() {
        match store.seal_next(&key, "test", 2).await.unwrap() {
            Some(checkpoint) => sealed += checkpoint.rows,
            None => {
                assert!(Instant::now() < deadline, "rows never got below the horizon");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let now = OffsetDateTime::now_utc();
    let window = filter(&[("since", "2024-01-31T00:00:00Z"), ("until", "2024-02-02T00:00:00Z")], now);
    assert_eq!(not_counted(&pool).await, 3, "the rollup counts the first three rows only");
    let before = store.issuance_timeline(&window, now).await.unwrap();
    assert_eq!(charted(&before), counted(&stored(&pool).await, &before, |_| true));

    let file = std::env::temp_dir().join(format!("credbroker-timeline-{}.jsonl", Uuid::new_v4().simple()));
    let summary = store.archive(&key, datetime!(2024-02-01 00:00 UTC), &file).await.unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(summary.rows, 4, "{summary:?}");
    let after = store.issuance_timeline(&window, now).await.unwrap();
    let remaining = stored(&pool).await;
    assert_eq!(remaining.len(), 2);
    let expected = counted(&remaining, &after, |_| true);
    assert_eq!(
        expected.into_iter().collect::<Vec<_>>(),
        vec![
            ((datetime!(2024-01-31 23:00 UTC), "kafka".to_owned(), "denied".to_owned()), 2),
            ((datetime!(2024-02-01 00:00 UTC), "kafka".to_owned(), "issued".to_owned()), 1),
        ]
    );
    assert_eq!(charted(&after), counted(&remaining, &after, |_| true));
    count_everything(&store, &pool).await;
    assert_eq!(charted(&store.issuance_timeline(&window, now).await.unwrap()), counted(&remaining, &after, |_| true));
    let left: i64 = sqlx::query_scalar("select count(*) from audit_timeline").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 2, "buckets emptied by the archive leave no rows behind");
}

/// The broker's role counts rows into the rollup but cannot write it, move where it stops, or
/// choose a row's transaction; the auditors' role reads it; only the owner may recount it.
#[tokio::test]
async fn only_the_log_writes_the_rollup() {
    let (owner_url, owner, broker_url) = database_with_login("credbroker_broker").await;
    let broker = PgPool::connect(&broker_url).await.unwrap();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, target, occurrences)
         select gen_random_uuid(), now(), 'role', 'denied', 'kafka', i from generate_series(1, 10) i",
    )
    .execute(&broker)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while not_counted(&broker).await > 0 {
        sqlx::query("select audit_timeline_catch_up()").execute(&broker).await.unwrap();
        assert!(Instant::now() < deadline, "the rows never got below the horizon");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events: i64 = sqlx::query_scalar("select sum(events)::bigint from audit_timeline").fetch_one(&broker).await.unwrap();
    assert_eq!(events, 55);
    for statement in [
        "insert into audit_timeline values (now(), 'kafka', 'issued', 1, 1000)",
        "update audit_timeline set events = events + 1000",
        "delete from audit_timeline",
        "update audit_timeline_progress set counted_below = '0'",
        "select audit_timeline_rebuild()",
        // A row that claimed an old transaction would lie below counted_below, never counted.
        "insert into audit_events (id, occurred_at, request_id, decision, tx) values (gen_random_uuid(), now(), 'old', 'denied', '3')",
    ] {
        let error = sqlx::query(statement).execute(&broker).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{statement}: {error}");
    }
    let auditor = PgPool::connect(&login_in("credbroker_auditor", &owner, &owner_url).await).await.unwrap();
    let seen: i64 = sqlx::query_scalar("select sum(events)::bigint from audit_timeline").fetch_one(&auditor).await.unwrap();
    assert_eq!(seen, 55);
    assert_eq!(not_counted(&auditor).await, 0);
    for statement in ["delete from audit_timeline", "select audit_timeline_catch_up()"] {
        let error = sqlx::query(statement).execute(&auditor).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{statement}: {error}");
    }
    // The owner can recount it from the rows, with the same result.
    let written: i64 = sqlx::query_scalar("select audit_timeline_rebuild()").fetch_one(&owner).await.unwrap();
    assert_eq!(written, 1);
    let events: i64 = sqlx::query_scalar("select sum(events)::bigint from audit_timeline").fetch_one(&owner).await.unwrap();
    assert_eq!(events, 55);
}

/// The broker's `/metrics` value of `name` (a gauge without labels).
async fn gauge(app: &TestApp, name: &str) -> f64 {
    let text = app.client.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')).unwrap_or_else(|| panic!("no {name} in {text}"));
    line.parse().unwrap()
}

/// While a transaction that has written something stays open, the rows after it wait uncounted
/// and the page reads them itself: `credbroker_audit_timeline_lag_seconds` is the age of the
/// oldest, so an operator sees it grow; once that transaction ends the broker's own catch-up
/// counts them and it is 0 again.
#[tokio::test]
async fn the_metrics_show_how_far_behind_the_rollup_is() {
    let app = TestApp::spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    let lag = "credbroker_audit_timeline_lag_seconds";
    common::eventually("the broker counts its first row", Duration::from_secs(20), async || gauge(&app, lag).await == 0.0).await;

    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("select pg_current_xact_id()").execute(&mut *holder).await.unwrap();
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let held = gauge(&app, lag).await;
    assert!((2.5..60.0).contains(&held), "{lag} {held} with the row 2.5 s old and uncounted");
    assert_eq!(not_counted(&app.pool).await, 1);

    holder.rollback().await.unwrap();
    common::eventually("the broker counts the row once the horizon passes it", Duration::from_secs(20), async || gauge(&app, lag).await == 0.0).await;
    assert_eq!(not_counted(&app.pool).await, 0);
}
