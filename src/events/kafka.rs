//! The Kafka sink of the event stream, and `[events]`, the configuration that starts it.
//!
//! The client is `rskafka`: pure Rust on the tokio and rustls the broker already uses, so no
//! C toolchain (librdkafka) enters the build. A batch is produced with `acks = all` (rskafka
//! always asks for it) and [`EventSink::publish`] returns Ok only after Kafka acknowledged
//! every record; anything else fails the whole batch and the outbox retries it.
//!
//! ```toml
//! [events]
//! kafka_bootstrap_servers = ["kafka-1.internal:9093", "kafka-2.internal:9093"]
//! topic = "credbroker.events"
//! sasl_username = "credbroker"                       # optional: SASL/SCRAM
//! sasl_password = { env = "KAFKA_EVENTS_PASSWORD" }  # or { file = ... } / { vault_kv = ... }
//! sasl_mechanism = "SCRAM-SHA-512"                   # SCRAM-SHA-256, SCRAM-SHA-512 (default), PLAIN (TLS only)
//! tls = true                                         # default false
//! tls_ca_file = "kafka-ca.pem"                       # optional; implies tls
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use secrecy::ExposeSecret;
use serde_json::Value;

use super::{EventSink, PublisherSettings};
use crate::audit::outbox::OutboxEvent;
use crate::config::{Config, ConfigError};
use crate::vault::secret_source::{self, SecretSource};
use crate::vault::Vault;

const DEFAULT_CLIENT_ID: &str = "credbroker";
const DEFAULT_TIMEOUT_SECONDS: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("cannot connect to Kafka ({servers}): {source}")]
    Connect { servers: String, source: rskafka::client::error::Error },
    #[error("cannot read topic metadata from Kafka: {0}")]
    Metadata(rskafka::client::error::Error),
    #[error("topic {0:?} does not exist in this Kafka cluster (create it; credbroker does not)")]
    UnknownTopic(String),
    #[error("producing to {topic} partition {partition} on Kafka failed: {source}")]
    Produce { topic: String, partition: i32, source: rskafka::client::error::Error },
    #[error("Kafka acknowledged {acknowledged} of {sent} records on {topic} partition {partition}")]
    ShortAcknowledgement { topic: String, partition: i32, sent: usize, acknowledged: usize },
    #[error("Kafka did not acknowledge the batch within {0:?}")]
    Timeout(Duration),
    #[error("the SASL password cannot be read: {0}")]
    Password(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    ScramSha256,
    ScramSha512,
    Plain,
}

pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// Read at every (re)connect, so a rotated password is picked up without a restart.
    pub password: Arc<dyn SecretSource>,
}

pub struct KafkaSinkConfig {
    pub bootstrap_servers: Vec<String>,
    pub topic: String,
    pub client_id: String,
    pub sasl: Option<Sasl>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The most one `publish` may take, connecting included; past it the batch fails.
    pub timeout: Duration,
}

/// `[events]`: where events go and how the publisher paces itself.
pub struct EventsConfig {
    pub sink: KafkaSinkConfig,
    pub publisher: PublisherSettings,
}

impl EventsConfig {
    pub fn parse(table: &toml::Table, config: &Config, vault: Option<&Vault>) -> Result<Self, ConfigError> {
        let file = config.source_name();
        let error = |key: &str, message: &str| ConfigError::new(&file, format!("events.{key}"), message);
        let known = [
            "kafka_bootstrap_servers",
            "topic",
            "client_id",
            "sasl_mechanism",
            "sasl_username",
            "sasl_password",
            "tls",
            "tls_ca_file",
            "timeout_seconds",
            "batch_size",
            "retry_backoff_seconds",
            "retry_backoff_max_seconds",
            "poll_interval_ms",
            "lease_seconds",
        ];
        if let Some(unknown) = table.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(error(unknown, &format!("unknown key; expected one of {known:?}")));
        }
        let bootstrap_servers = match table.get("kafka_bootstrap_servers") {
            None => return Err(error("kafka_bootstrap_servers", "is required: a list of \"host:port\"")),
            Some(toml::Value::String(list)) => list.split(',').map(|s| s.trim().to_owned()).collect::<Vec<_>>(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| error("kafka_bootstrap_servers", "must list \"host:port\" strings"))?,
            Some(_) => return Err(error("kafka_bootstrap_servers", "must be a list of \"host:port\"")),
        };
        if bootstrap_servers.is_empty() {
            return Err(error("kafka_bootstrap_servers", "must name at least one \"host:port\""));
        }
        for server in &bootstrap_servers {
            let valid = server.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !valid {
                return Err(error("kafka_bootstrap_servers", &format!("{server:?} is not \"host:port\"")));
            }
        }
        let string = |key: &str| match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) if !value.trim().is_empty() => Ok(Some(value.clone())),
            Some(_) => Err(error(key, "must be a non-empty string")),
        };
        let topic = string("topic")?.ok_or_else(|| error("topic", "is required: the Kafka topic events are produced to"))?;
        // Kafka's own rule for topic names.
        if topic.len() > 249 || topic == "." || topic == ".." || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(error("topic", "Kafka topic names are at most 249 of a-z, A-Z, 0-9, '.', '_' and '-'"));
        }
        let client_id = string("client_id")?.unwrap_or_else(|| DEFAULT_CLIENT_ID.to_owned());
        let integer = |key: &str, default: i64, range: std::ops::RangeInclusive<i64>| match table.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(value)) if range.contains(value) => Ok(*value),
            Some(_) => Err(error(key, &format!("must be an integer from {} to {}", range.start(), range.end()))),
        };

        let tls_ca_file = string("tls_ca_file")?.map(|path| config.resolve(&PathBuf::from(path)));
        let tls = match table.get("tls") {
            None => tls_ca_file.is_some(),
            Some(toml::Value::Boolean(false)) if tls_ca_file.is_some() => return Err(error("tls", "is false but tls_ca_file is set")),
            Some(toml::Value::Boolean(flag)) => *flag,
            Some(_) => return Err(error("tls", "must be true or false")),
        };
        let tls = match tls {
            true => Some(tls_client_config(tls_ca_file.as_deref()).map_err(|m| error(if tls_ca_file.is_some() { "tls_ca_file" } else { "tls" }, &m))?),
            false => None,
        };

        let sasl = match (string("sasl_username")?, table.get("sasl_password")) {
            (None, None) => {
                if table.contains_key("sasl_mechanism") {
                    return Err(error("sasl_mechanism", "needs sasl_username and sasl_password"));
                }
                None
            }
            (Some(_), None) => return Err(error("sasl_password", "is required with sasl_username: { env = \"...\" } or { file = \"...\" }")),
            (None, Some(_)) => return Err(error("sasl_username", "is required with sasl_password")),
            (Some(username), Some(password)) => {
                let mechanism = match string("sasl_mechanism")?.as_deref() {
                    None | Some("SCRAM-SHA-512") => SaslMechanism::ScramSha512,
                    Some("SCRAM-SHA-256") => SaslMechanism::ScramSha256,
                    Some("PLAIN") if tls.is_some() => SaslMechanism::Plain,
                    Some("PLAIN") => return Err(error("sasl_mechanism", "PLAIN sends the password as it is: it needs tls = true")),
                    Some(_) => return Err(error("sasl_mechanism", "must be SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN")),
                };
                let password = secret_source::parse(password, &file, "events.sasl_password", &config.base_dir, vault)?;
                Some(Sasl { mechanism, username, password })
            }
        };

        let timeout_seconds = integer("timeout_seconds", DEFAULT_TIMEOUT_SECONDS, 1..=300)?;
        let defaults = PublisherSettings::default();
        let batch_size = integer("batch_size", defaults.batch_size, 1..=10_000)?;
        let backoff_base = integer("retry_backoff_seconds", defaults.backoff_base.as_secs() as i64, 1..=3600)?;
        let backoff_max = integer("retry_backoff_max_seconds", defaults.backoff_max.as_secs() as i64, 1..=86_400)?;
        if backoff_max < backoff_base {
            return Err(error("retry_backoff_max_seconds", "must be at least retry_backoff_seconds"));
        }
        let poll_interval_ms = integer("poll_interval_ms", defaults.poll_interval.as_millis() as i64, 10..=60_000)?;
        let lease_seconds = integer("lease_seconds", defaults.lease.as_secs() as i64, 2..=3600)?;
        // A lease shorter than a publish would let another replica claim events still in flight.
        if lease_seconds <= timeout_seconds {
            return Err(error("lease_seconds", &format!("must be longer than timeout_seconds ({timeout_seconds})")));
        }
        Ok(Self {
            sink: KafkaSinkConfig { bootstrap_servers, topic, client_id, sasl, tls, timeout: Duration::from_secs(timeout_seconds as u64) },
            publisher: PublisherSettings {
                batch_size,
                lease: Duration::from_secs(lease_seconds as u64),
                backoff_base: Duration::from_secs(backoff_base as u64),
                backoff_max: Duration::from_secs(backoff_max as u64),
                poll_interval: Duration::from_millis(poll_interval_ms as u64),
            },
        })
    }
}

/// The platform's roots, plus `ca_file` (PEM) when given.
fn tls_client_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        // One unparsable system certificate must not disable TLS to Kafka.
        let _ = roots.add(certificate);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            let certificate = certificate.map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
            roots.add(certificate).map_err(|e| format!("{}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{} holds no certificate", path.display()));
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificates found; set tls_ca_file".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection and one client per partition of the topic, made on first use and dropped
/// after any failure, so a restarted or moved cluster is found again from the bootstrap list.
struct Connection {
    partitions: Vec<PartitionClient>,
}

pub struct KafkaSink {
    config: KafkaSinkConfig,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

impl KafkaSink {
    pub fn new(config: KafkaSinkConfig) -> Self {
        Self { config, connection: tokio::sync::Mutex::new(None) }
    }

    #[tracing::instrument(skip_all, fields(topic = %self.config.topic))]
    async fn connect(&self) -> Result<Connection, KafkaSinkError> {
        let servers = self.config.bootstrap_servers.join(",");
        let backoff = rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            // rskafka retries a broken connection forever by default; the outbox is the retry
            // loop here, so give up within one publish.
            deadline: Some(self.config.timeout),
        };
        let mut builder = ClientBuilder::new(self.config.bootstrap_servers.clone())
            .client_id(self.config.client_id.clone())
            .backoff_config(backoff);
        if let Some(tls) = &self.config.tls {
            builder = builder.tls_config(tls.clone());
        }
        if let Some(sasl) = &self.config.sasl {
            let password = sasl.password.read().await.map_err(|e| KafkaSinkError::Password(e.to_string()))?;
            let credentials = Credentials::new(sasl.username.clone(), password.expose_secret().to_owned());
            builder = builder.sasl_config(match sasl.mechanism {
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
                SaslMechanism::Plain => SaslConfig::Plain(credentials),
            });
        }
        let client = builder.build().await.map_err(|source| KafkaSinkError::Connect { servers, source })?;
        let topics = client.list_topics().await.map_err(KafkaSinkError::Metadata)?;
        let topic = topics
            .into_iter()
            .find(|topic| topic.name == self.config.topic)
            .ok_or_else(|| KafkaSinkError::UnknownTopic(self.config.topic.clone()))?;
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        // Partition ids are 0..n; the key's hash picks one the way Kafka's own producers do.
        for partition in 0..topic.partitions.len() as i32 {
            let client = client
                .partition_client(self.config.topic.clone(), partition, UnknownTopicHandling::Error)
                .await
                .map_err(|source| KafkaSinkError::Produce { topic: self.config.topic.clone(), partition, source })?;
            partitions.push(client);
        }
        if partitions.is_empty() {
            return Err(KafkaSinkError::UnknownTopic(self.config.topic.clone()));
        }
        tracing::info!(partitions = partitions.len(), "connected to Kafka for the event stream");
        Ok(Connection { partitions })
    }

    async fn produce(&self, events: &[OutboxEvent]) -> Result<(), KafkaSinkError> {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            *connection = Some(self.connect().await?);
        }
        let partitions = &connection.as_ref().expect("connected above").partitions;
        let mut by_partition: BTreeMap<usize, Vec<Record>> = BTreeMap::new();
        let timestamp = rskafka::chrono::DateTime::from_timestamp_millis((time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
            .unwrap_or_default();
        for event in events {
            let partition = partition_for(event.key.as_bytes(), partitions.len());
            by_partition.entry(partition).or_default().push(record(event, timestamp));
        }
        // One produce request per partition the batch touches, in turn: a batch is small
        // (batch_size) and the publisher has nothing else to do while it waits.
        for (partition, records) in by_partition {
            let client = &partitions[partition];
            let sent = records.len();
            let offsets = client.produce(records, Compression::NoCompression).await.map_err(|source| KafkaSinkError::Produce {
                topic: self.config.topic.clone(),
                partition: client.partition(),
                source,
            })?;
            if offsets.len() != sent {
                return Err(KafkaSinkError::ShortAcknowledgement {
                    topic: self.config.topic.clone(),
                    partition: client.partition(),
                    sent,
                    acknowledged: offsets.len(),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventSink for KafkaSink {
    #[tracing::instrument(skip_all, fields(topic = %self.config.topic, events = events.len()))]
    async fn publish(&self, events: &[OutboxEvent]) -> Result<(), String> {
        let outcome = match tokio::time::timeout(self.config.timeout, self.produce(events)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(KafkaSinkError::Timeout(self.config.timeout)),
        };
        if outcome.is_err() {
            // Whatever broke (a broker gone, a leader moved), start from the bootstrap list.
            *self.connection.lock().await = None;
        }
        outcome.map_err(|error| error.to_string())
    }
}

/// Key = the event key (audit id or delivery id, so consumers can deduplicate); value = the
/// payload with its `kind`; header `kind` too, for consumers that route without parsing.
fn record(event: &OutboxEvent, timestamp: rskafka::chrono::DateTime<rskafka::chrono::Utc>) -> Record {
    let mut value = match &event.payload {
        Value::Object(object) => object.clone(),
        other => serde_json::Map::from_iter([("payload".to_owned(), other.clone())]),
    };
    value.insert("kind".to_owned(), Value::String(event.kind.clone()));
    Record {
        key: Some(event.key.as_bytes().to_vec()),
        value: Some(serde_json::to_vec(&value).expect("JSON values serialise")),
        headers: BTreeMap::from([("kind".to_owned(), event.kind.as_bytes().to_vec())]),
        timestamp,
    }
}

/// Kafka's default partitioner for keyed records (`toPositive(murmur2(key)) % partitions`), so
/// events with one key land where a Java or librdkafka producer would put them.
fn partition_for(key: &[u8], partitions: usize) -> usize {
    (murmur2(key) & 0x7fff_ffff) as usize % partitions
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
        }
        assert!(partition_for(b"abc", 3) < 3);
        assert_eq!(partition_for(b"anything", 1), 0);
    }

    #[test]
    fn records_carry_the_key_the_payload_and_its_kind() {
        let event = OutboxEvent {
            id: 7,
            kind: "credential.issued".into(),
            key: "0b3c".into(),
            payload: serde_json::json!({"id": "0b3c", "role": "deploy"}),
            attempts: 0,
        };
        let record = record(&event, Default::default());
        assert_eq!(record.key.as_deref(), Some(b"0b3c".as_slice()));
        let value: Value = serde_json::from_slice(record.value.as_deref().unwrap()).unwrap();
        assert_eq!(value, serde_json::json!({"id": "0b3c", "role": "deploy", "kind": "credential.issued"}));
        assert_eq!(record.headers["kind"], b"credential.issued");
    }

    fn parse(events: &str) -> Result<EventsConfig, ConfigError> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:1\"\naudience = \"credbroker\"\n\
             database_url = \"postgres://127.0.0.1:1/none\"\npolicy_dir = \"policies\"\n[events]\n{events}\n"
        );
        let config = Config::parse(&text, std::path::Path::new("/etc/credbroker/credbroker.toml"), std::iter::empty()).unwrap();
        EventsConfig::parse(config.events.as_ref().unwrap(), &config, None)
    }

    #[test]
    fn events_config_defaults_and_errors_that_name_the_key() {
        let config = parse("kafka_bootstrap_servers = [\"127.0.0.1:9092\"]\ntopic = \"credbroker.events\"").unwrap();
        assert_eq!(config.sink.bootstrap_servers, ["127.0.0.1:9092"]);
        assert_eq!(config.sink.client_id, "credbroker");
        assert!(config.sink.sasl.is_none() && config.sink.tls.is_none());
        assert_eq!(config.publisher.batch_size, 100);
        let config = parse(
            "kafka_bootstrap_servers = \"a:1, b:2\"\ntopic = \"t\"\nsasl_username = \"u\"\nsasl_password = { env = \"P\" }\n\
             sasl_mechanism = \"SCRAM-SHA-256\"\nbatch_size = 5\nretry_backoff_seconds = 2\nretry_backoff_max_seconds = 4\npoll_interval_ms = 50",
        )
        .unwrap();
        assert_eq!(config.sink.bootstrap_servers, ["a:1", "b:2"]);
        assert_eq!(config.sink.sasl.as_ref().unwrap().mechanism, SaslMechanism::ScramSha256);
        assert_eq!(config.publisher.batch_size, 5);
        assert_eq!(config.publisher.backoff_max, Duration::from_secs(4));

        let base = "kafka_bootstrap_servers = [\"127.0.0.1:9092\"]\ntopic = \"t\"";
        let cases = [
            ("topic = \"t\"".to_owned(), "events.kafka_bootstrap_servers"),
            ("kafka_bootstrap_servers = [\"nohost\"]\ntopic = \"t\"".to_owned(), "events.kafka_bootstrap_servers"),
            ("kafka_bootstrap_servers = [\"h:1\"]".to_owned(), "events.topic"),
            ("kafka_bootstrap_servers = [\"h:1\"]\ntopic = \"a topic\"".to_owned(), "events.topic"),
            (format!("{base}\ncolour = \"blue\""), "events.colour"),
            (format!("{base}\nsasl_username = \"u\""), "events.sasl_password"),
            (format!("{base}\nsasl_password = {{ env = \"P\" }}"), "events.sasl_username"),
            (format!("{base}\nsasl_username = \"u\"\nsasl_password = \"inline\""), "events.sasl_password"),
            (format!("{base}\nsasl_username = \"u\"\nsasl_password = {{ env = \"P\" }}\nsasl_mechanism = \"PLAIN\""), "events.sasl_mechanism"),
            (format!("{base}\nsasl_username = \"u\"\nsasl_password = {{ env = \"P\" }}\nsasl_mechanism = \"GSSAPI\""), "events.sasl_mechanism"),
            (format!("{base}\nsasl_username = \"u\"\nsasl_password = {{ vault_kv = \"kafka\", key = \"password\" }}"), "events.sasl_password.vault_kv"),
            (format!("{base}\ntls_ca_file = \"/nonexistent/ca.pem\""), "events.tls_ca_file"),
            (format!("{base}\ntls = \"yes\""), "events.tls"),
            (format!("{base}\nbatch_size = 0"), "events.batch_size"),
            (format!("{base}\nretry_backoff_seconds = 10\nretry_backoff_max_seconds = 5"), "events.retry_backoff_max_seconds"),
            (format!("{base}\ntimeout_seconds = 30\nlease_seconds = 30"), "events.lease_seconds"),
        ];
        for (events, key) in cases {
            let error = match parse(&events) {
                Ok(_) => panic!("{events:?} was accepted"),
                Err(error) => error.to_string(),
            };
            assert!(error.contains(&format!("key `{key}`")), "{events:?}: expected key {key} in: {error}");
        }
    }
}
