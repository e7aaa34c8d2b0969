//! The event stream end to end against a real Kafka-protocol broker: tansu (PEERS.md), started
//! here on 127.0.0.1 and stopped by PID. The real broker (real Postgres, a real OIDC issuer)
//! issues credentials and accepts a signed Gogs delivery; the publisher `serve` starts from
//! `[events]` produces them through the production `KafkaSink`; the test reads the topic back
//! with a Kafka client of its own. Then Kafka goes away: events wait in `event_outbox` with
//! their attempts and error, and all of them arrive once Kafka is back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::tansu::Tansu;
use common::{rsa_pem, temp_dir, TempDir, TestApp};
use hmac::{Hmac, Mac};
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::ClientBuilder;
use serde_json::{json, Value};

const TOPIC: &str = "credbroker.events";
const PARTITIONS: i32 = 3;
const SECRET: &str = "gogs-hook-secret-0123";
const MAIN_SHA: &str = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";

/// (partition, key, value as JSON, headers) of one record read back from the topic.
type TopicRecord = (i32, String, Value, BTreeMap<String, Vec<u8>>);
/// (event_key, kind, attempts, last_error, delivered) of one `event_outbox` row.
type OutboxRow = (String, String, i32, Option<String>, bool);

/// Topic helpers on the shared tansu peer (tests/common/tansu.rs).
impl Tansu {
    async fn client(&self) -> rskafka::client::Client {
        ClientBuilder::new(vec![self.bootstrap()]).build().await.expect("connect to tansu")
    }

    async fn create_topic(&self) {
        let client = self.client().await;
        client.controller_client().unwrap().create_topic(TOPIC, PARTITIONS, 1, 5_000).await.expect("create the topic");
    }

    /// Every record on the topic.
    async fn read_topic(&self) -> Vec<TopicRecord> {
        let client = self.client().await;
        let mut all = Vec::new();
        for partition in 0..PARTITIONS {
            let partition_client = client.partition_client(TOPIC, partition, UnknownTopicHandling::Retry).await.unwrap();
            let mut offset = 0;
            loop {
                let (records, high_watermark) = partition_client.fetch_records(offset, 1..1_000_000, 100).await.unwrap();
                for record in &records {
                    let key = String::from_utf8(record.record.key.clone().unwrap_or_default()).unwrap();
                    let value: Value = serde_json::from_slice(record.record.value.as_deref().unwrap_or_default()).unwrap();
                    all.push((partition, key, value, record.record.headers.clone()));
                    offset = record.offset + 1;
                }
                if offset >= high_watermark || records.is_empty() {
                    break;
                }
            }
        }
        all
    }
}

const GOGS_POLICY: &str = r#"
[[role]]
name = "warehouse-deploy"
backend = "kafka"
issuer = "gogs"
default_ttl = "5m"
max_ttl = "10m"
principal = "gogs:{repository}@{sha}"
[role.claims]
repository = "data/warehouse"
ref = "refs/heads/main"
"#;

struct Stream {
    app: TestApp,
    _keys: TempDir,
}

async fn spawn_broker(events: &str) -> Stream {
    let keys = temp_dir();
    let key_file = keys.0.join("gogs.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    let secret_file = keys.0.join("hook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let tables = format!(
        "{events}\n[gogs]\nsigning_key_file = \"{}\"\n[gogs.hooks.relay]\nsecret = {{ file = \"{}\" }}\nrepositories = [\"data/*\"]\nrespond_with_token = true\n",
        key_file.display(),
        secret_file.display()
    );
    let policies = format!("{}\n{GOGS_POLICY}", common::POLICIES);
    Stream { app: TestApp::spawn_full("", &tables, &policies, None).await, _keys: keys }
}

fn events_table(bootstrap: &str) -> String {
    format!(
        "[events]\nkafka_bootstrap_servers = [\"{bootstrap}\"]\ntopic = \"{TOPIC}\"\ntimeout_seconds = 2\nlease_seconds = 5\n\
         retry_backoff_seconds = 1\nretry_backoff_max_seconds = 1\npoll_interval_ms = 100\n"
    )
}

impl Stream {
    /// Issues one Kafka credential; returns (issuance id, credential token).
    async fn issue(&self) -> (String, String) {
        let (status, _, body) = self.app.exchange(&self.app.issuer.token(), json!({"role": "orders-producer"})).await;
        assert_eq!(status, 200, "{body}");
        (body["issuance_id"].as_str().unwrap().to_owned(), body["credential"]["token"].as_str().unwrap().to_owned())
    }

    /// A push delivery signed as Gogs signs it; returns its delivery id and the id of its audit
    /// row (the delivery token's `credential.issued`). Each push is a different one: the broker
    /// accepts a body once.
    async fn deliver_push(&self) -> (String, String) {
        let id = uuid::Uuid::new_v4().to_string();
        let payload = serde_json::to_string_pretty(&json!({
            "ref": "refs/heads/main",
            "before": "1111111111111111111111111111111111111111",
            "after": MAIN_SHA,
            "commits": [{ "id": MAIN_SHA, "message": format!("run {id}") }],
            "repository": { "id": 17, "name": "warehouse", "full_name": "data/warehouse", "owner": { "username": "data" } },
            "pusher": { "name": "alice", "username": "alice", "email": "alice@example.com" },
            "sender": { "login": "alice", "id": 5 }
        }))
        .unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(payload.as_bytes());
        let response = self
            .app
            .client
            .post(format!("{}/v1/hooks/gogs/relay", self.app.url))
            .header("content-type", "application/json")
            .header("x-gogs-event", "push")
            .header("x-gogs-delivery", &id)
            .header("x-gogs-signature", hex::encode(mac.finalize().into_bytes()))
            .body(payload)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        (id, answer["issuance_id"].as_str().unwrap().to_owned())
    }

    async fn outbox(&self) -> Vec<OutboxRow> {
        sqlx::query_as("select event_key, kind, attempts, last_error, delivered_at is not null from event_outbox order by id")
            .fetch_all(&self.app.pool)
            .await
            .unwrap()
    }

    async fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&[OutboxRow]) -> bool) {
        let started = Instant::now();
        loop {
            let rows = self.outbox().await;
            if check(&rows) {
                return;
            }
            assert!(started.elapsed() < timeout, "timed out waiting for {what}: {rows:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Whether inserts into `audit_events` run the outbox trigger (migration 0020 turns it off with
/// the outbox).
async fn audit_trigger_enabled(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("select tgenabled <> 'D' from pg_trigger where tgrelid = 'audit_events'::regclass and tgname = 'audit_events_to_outbox'")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn sha256_hex(text: &str) -> String {
    credbroker::types::sha256_hex(text.as_bytes())
}

#[tokio::test]
async fn issued_and_delivery_events_reach_kafka_and_survive_a_kafka_outage() {
    let dir = temp_dir();
    let mut tansu = Tansu::start(&dir.0).await;
    tansu.create_topic().await;
    let stream = spawn_broker(&events_table(&tansu.bootstrap())).await;
    let enabled: bool = sqlx::query_scalar("select enabled from event_outbox_settings").fetch_one(&stream.app.pool).await.unwrap();
    assert!(enabled, "[events] turns queueing on");
    assert!(audit_trigger_enabled(&stream.app.pool).await, "and the audit log's outbox trigger with it");

    let (first_id, first_token) = stream.issue().await;
    let (delivery_id, delivery_row_id) = stream.deliver_push().await;
    let (second_id, _) = stream.issue().await;
    // A denial is not an event for the stream.
    let (status, _, _) = stream.app.exchange("garbage", json!({"role": "orders-producer"})).await;
    assert_eq!(status, 401);

    stream.wait_for("4 events delivered", Duration::from_secs(20), |rows| rows.len() == 4 && rows.iter().all(|row| row.4)).await;
    let records = tansu.read_topic().await;
    let by_key: BTreeMap<&str, &TopicRecord> = records.iter().map(|r| (r.1.as_str(), r)).collect();
    assert_eq!(
        by_key.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([first_id.as_str(), second_id.as_str(), delivery_id.as_str(), delivery_row_id.as_str()]),
        "{records:?}"
    );

    let (_, _, issued, headers) = by_key[first_id.as_str()];
    assert_eq!(issued["kind"], "credential.issued");
    assert_eq!(headers["kind"], b"credential.issued");
    assert_eq!(issued["id"], first_id.as_str());
    assert_eq!(issued["decision"], "issued");
    assert_eq!(issued["issuer"], "gitlab");
    assert_eq!(issued["role"], "orders-producer");
    assert_eq!(issued["backend"], "kafka");
    assert_eq!(issued["project_path"], "platform/orders");
    assert_eq!(issued["credential_sha256"], sha256_hex(&first_token));
    assert!(!issued.to_string().contains(&first_token), "the credential itself is never an event");

    let (_, _, delivery, headers) = by_key[delivery_id.as_str()];
    assert_eq!(delivery["kind"], "gogs.delivery");
    assert_eq!(headers["kind"], b"gogs.delivery");
    assert_eq!(delivery["delivery_id"], delivery_id.as_str());
    assert_eq!(delivery["hook"], "relay");
    assert_eq!(delivery["event"], "push");
    assert_eq!(delivery["repository"], "data/warehouse");
    assert_eq!(delivery["ref"], "refs/heads/main");
    assert_eq!(delivery["after"], MAIN_SHA);
    assert_eq!(delivery["pusher"], "alice");
    // The delivery token is a credential the broker issued.
    let (_, _, token, _) = by_key[delivery_row_id.as_str()];
    assert_eq!(token["kind"], "credential.issued");
    assert_eq!((token["issuer"].as_str(), token["backend"].as_str()), (Some("gogs"), Some("gogs")));

    // Kafka goes away. Events keep committing with their rows and wait in the outbox.
    tansu.stop();
    let issued_during_outage = stream.issue().await.0;
    let (outage_delivery, outage_delivery_row) = stream.deliver_push().await;
    let mut during_outage = vec![issued_during_outage, outage_delivery, outage_delivery_row, stream.issue().await.0];
    stream
        .wait_for("the outage events to fail at least once", Duration::from_secs(20), |rows| {
            let pending: Vec<_> = rows.iter().filter(|row| during_outage.contains(&row.0)).collect();
            pending.len() == 4 && pending.iter().all(|row| !row.4 && row.2 > 0 && row.3.is_some())
        })
        .await;
    let rows = stream.outbox().await;
    for row in rows.iter().filter(|row| during_outage.contains(&row.0)) {
        assert!(!row.4, "not delivered while Kafka is down: {row:?}");
        assert!(row.2 > 0, "attempts counted: {row:?}");
        let error = row.3.as_deref().unwrap();
        assert!(error.contains("Kafka") || error.contains("connect"), "last_error says what failed: {error}");
    }
    // Retried with backoff while it stays down, and nothing is dropped or marked delivered.
    stream
        .wait_for("a second attempt at every outage event", Duration::from_secs(20), |rows| {
            let pending: Vec<_> = rows.iter().filter(|row| during_outage.contains(&row.0)).collect();
            pending.len() == 4 && pending.iter().all(|row| !row.4 && row.2 >= 2)
        })
        .await;

    // Kafka comes back (in-memory storage: a fresh cluster, so the topic is made again).
    tansu.restart().await;
    tansu.create_topic().await;
    stream.wait_for("every event delivered after the outage", Duration::from_secs(30), |rows| rows.len() == 8 && rows.iter().all(|row| row.4)).await;
    let keys: BTreeSet<String> = tansu.read_topic().await.into_iter().map(|record| record.1).collect();
    during_outage.sort();
    for key in &during_outage {
        assert!(keys.contains(key), "event {key} was lost: {keys:?}");
    }
    let rows = stream.outbox().await;
    assert!(rows.iter().all(|row| row.3.is_none()), "a delivered event keeps no error: {rows:?}");
}

#[tokio::test]
async fn without_events_configured_nothing_is_queued() {
    let stream = spawn_broker("").await;
    let enabled: bool = sqlx::query_scalar("select enabled from event_outbox_settings").fetch_one(&stream.app.pool).await.unwrap();
    assert!(!enabled);
    assert!(!audit_trigger_enabled(&stream.app.pool).await, "an outbox nobody reads costs inserts nothing");
    stream.issue().await;
    stream.deliver_push().await;
    assert!(stream.outbox().await.is_empty());
}

#[tokio::test]
async fn a_broken_events_section_fails_the_start_naming_the_key() {
    for (events, key) in [
        ("[events]\ntopic = \"t\"\n", "events.kafka_bootstrap_servers"),
        ("[events]\nkafka_bootstrap_servers = [\"127.0.0.1:9\"]\ntopic = \"t\"\nsasl_username = \"u\"\n", "events.sasl_password"),
    ] {
        let dir = temp_dir();
        std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
        std::fs::write(dir.0.join("kafka.pem"), rsa_pem(2)).unwrap();
        let text = common::config_text_with_tables("https://gitlab.example.com", "postgres://127.0.0.1:1/none", "http://127.0.0.1:1", "", events);
        let path = dir.0.join("credbroker.toml");
        let config = credbroker::config::Config::parse(&text, &path, std::iter::empty()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = match credbroker::startup::Application::build_on(listener, config, Default::default()).await {
            Ok(_) => panic!("{events:?} was accepted"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(&format!("key `{key}`")), "{events:?}: {error}");
    }
}

/// Postgres away when `serve` starts (the broker runs as credbroker_broker, which does not
/// migrate): the start does not fail, and the publisher turns the outbox on once Postgres
/// answers, before anything could be issued and missed.
#[tokio::test]
async fn the_outbox_is_enabled_once_postgres_answers_after_a_start_without_it() {
    let database_url = common::fresh_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    credbroker::audit::migrate(&pool).await.unwrap();
    let (proxy, proxied_url) = common::PostgresProxy::start(&database_url).await;
    proxy.down();

    let dir = temp_dir();
    std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
    std::fs::write(dir.0.join("kafka.pem"), rsa_pem(2)).unwrap();
    // Nothing listens on port 9: the sink only ever fails, which does not matter here.
    let text = common::config_text_with_tables(
        "https://gitlab.example.com",
        &proxied_url,
        "http://127.0.0.1:1",
        "migrate_on_start = false",
        &events_table("127.0.0.1:9"),
    );
    let path = dir.0.join("credbroker.toml");
    let config = credbroker::config::Config::parse(&text, &path, std::iter::empty()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let application = credbroker::startup::Application::build_on(listener, config, Default::default()).await.expect("starts without Postgres");
    tokio::spawn(application.run_until_stopped());
    let enabled = || async { sqlx::query_scalar::<_, bool>("select enabled from event_outbox_settings").fetch_one(&pool).await.unwrap() };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!enabled().await, "nothing could reach Postgres yet");

    proxy.up();
    let started = Instant::now();
    while !enabled().await {
        assert!(started.elapsed() < Duration::from_secs(15), "the outbox was never enabled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
