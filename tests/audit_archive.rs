//! Archiving by time partition (issue 7, migration 0013) on real Postgres: whole sealed
//! checkpoints older than a cut move to a file and out of the database, after which
//! `audit verify` still proves the rest intact (and still catches tampering in it), the file
//! verifies on its own, a cut inside a checkpoint is refused, and nobody but the owner can
//! remove sealed rows. Also what the log's tables refuse to hold in the first place.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::rsa_pem;
use credbroker::audit::checkpoints::{FindingKind, SealError};
use credbroker::audit::PgAudit;
use credbroker::signing::SigningKey;
use sqlx::PgPool;
use time::macros::datetime;
use time::OffsetDateTime;
use uuid::Uuid;

struct Log {
    store: PgAudit,
    pool: PgPool,
    url: String,
    key: SigningKey,
    dir: PathBuf,
}

fn key() -> SigningKey {
    SigningKey::from_pem(rsa_pem(1).as_bytes()).unwrap()
}

async fn insert(pool: &PgPool, occurred_at: OffsetDateTime, login: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into audit_events (id, occurred_at, request_id, decision, project_path, user_login, claims)
         values ($1, $2, 'seed', 'denied', 'platform/orders', $3, jsonb_build_object('user_login', $3::text))",
    )
    .bind(id)
    .bind(occurred_at)
    .bind(login)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A fresh, migrated database.
async fn empty_log() -> Log {
    let url = common::fresh_database().await;
    let store = PgAudit::connect(&secrecy::SecretString::from(url.clone()), 4, Duration::from_secs(5)).unwrap();
    credbroker::audit::migrate(store.pool()).await.unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    let dir = std::env::temp_dir().join(format!("credbroker-archive-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    Log { store, pool, url, key: key(), dir }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Log {
    /// One row per time (one transaction each, so in this order), then sealed `per_checkpoint`
    /// rows at a time once all of them are below the horizon, so checkpoint borders fall
    /// exactly every `per_checkpoint` rows whatever else runs on the cluster.
    async fn add_sealed(&self, times: &[OffsetDateTime], per_checkpoint: i64) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for (n, at) in times.iter().enumerate() {
            ids.push(insert(&self.pool, *at, &format!("user-{n}")).await);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let invisible: i64 = sqlx::query_scalar("select count(*) from audit_events where tx >= pg_snapshot_xmin(pg_current_snapshot())")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if invisible == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "rows never got below the horizon");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while self.store.seal_next(&self.key, "test", per_checkpoint).await.unwrap().is_some() {}
        ids
    }

    async fn checkpoints(&self) -> Vec<i64> {
        sqlx::query_scalar("select number from audit_checkpoints order by number").fetch_all(&self.pool).await.unwrap()
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar("select count(*) from audit_events").fetch_one(&self.pool).await.unwrap()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn credbroker(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(args)
        .env_remove("CREDBROKER_CONFIG")
        .env_remove("CREDBROKER_DATABASE_URL")
        .output()
        .unwrap()
}

const JANUARY: [OffsetDateTime; 6] = [
    datetime!(2024-01-01 00:00 UTC),
    datetime!(2024-01-02 00:00 UTC),
    datetime!(2024-01-03 00:00 UTC),
    datetime!(2024-01-04 00:00 UTC),
    datetime!(2024-01-05 00:00 UTC),
    datetime!(2024-01-06 00:00 UTC),
];
const MARCH: [OffsetDateTime; 6] = [
    datetime!(2024-03-01 00:00 UTC),
    datetime!(2024-03-02 00:00 UTC),
    datetime!(2024-03-03 00:00 UTC),
    datetime!(2024-03-04 00:00 UTC),
    datetime!(2024-03-05 00:00 UTC),
    datetime!(2024-03-06 00:00 UTC),
];

#[tokio::test]
async fn archive_leaves_verify_intact_and_the_file_verifies_on_its_own() {
    let log = empty_log().await;
    let ids = log.add_sealed(&[JANUARY, MARCH].concat(), 3).await;
    assert_eq!(log.checkpoints().await, vec![1, 2, 3, 4]);

    // Through the CLI, as an operator would: January's two checkpoints leave.
    let key_file = log.file("seal.pem");
    std::fs::write(&key_file, rsa_pem(1)).unwrap();
    let archive = log.file("2024-01.jsonl");
    let (url, key_path, out) = (log.url.clone(), key_file.display().to_string(), archive.display().to_string());
    let archived = tokio::task::spawn_blocking(move || {
        credbroker(&["audit", "archive", "--database-url", &url, "--key", &key_path, "--before", "2024-02-01T00:00:00Z", "--out", &out])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&archived.stdout);
    assert!(archived.status.success(), "{stdout}{}", String::from_utf8_lossy(&archived.stderr));
    assert!(stdout.starts_with("archived checkpoints 1 to 2 (6 rows)"), "{stdout}");
    assert_eq!(log.checkpoints().await, vec![3, 4]);
    assert_eq!(log.rows().await, 6);
    let gone: i64 = sqlx::query_scalar("select count(*) from audit_events where id = any($1)").bind(&ids[..6]).fetch_one(&log.pool).await.unwrap();
    assert_eq!(gone, 0);
    let (through, rows, sha256): (i64, i64, String) =
        sqlx::query_as("select through_checkpoint, row_count, archive_sha256 from audit_archives").fetch_one(&log.pool).await.unwrap();
    assert_eq!((through, rows), (2, 6));
    assert!(stdout.contains(&sha256), "{stdout}");

    // What remains verifies: checkpoint 3 chains to the archived checkpoint 2's signed root.
    let report = log.store.verify_seals(&log.key, None).await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!((report.checkpoints, report.rows_checked, report.archived_through), (2, 6, Some(2)));
    let report = log.store.verify_seals(&log.key, Some(datetime!(2024-03-05 00:00 UTC))).await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.checkpoints, 1);

    // The file on its own, through the CLI too.
    let (report, previous_root) = credbroker::audit::checkpoints::verify_archive(&log.key, &archive).unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!((report.checkpoints, report.rows_checked, report.last_checkpoint), (2, 6, Some(2)));
    assert_eq!(previous_root, "0".repeat(64));
    let (key_path, file) = (key_file.display().to_string(), archive.display().to_string());
    let verified = tokio::task::spawn_blocking(move || credbroker(&["audit", "verify", "--key", &key_path, "--archive", &file])).await.unwrap();
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success() && stdout.starts_with("intact: archive of checkpoints 1 to 2, 6 rows verified"), "{stdout}");
    let (url, key_path) = (log.url.clone(), key_file.display().to_string());
    let verified = tokio::task::spawn_blocking(move || credbroker(&["audit", "verify", "--database-url", &url, "--key", &key_path])).await.unwrap();
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success() && stdout.contains("checkpoints 1 to 2 archived"), "{stdout}");

    // Sealing and archiving carry on: new rows, then everything sealed so far leaves, and the
    // next checkpoint, sealed with no checkpoint left in the table, chains to the archive.
    log.add_sealed(&[datetime!(2024-04-01 00:00 UTC)], 3).await;
    assert_eq!(log.checkpoints().await, vec![3, 4, 5]);
    let summary = log.store.archive(&log.key, datetime!(2024-05-01 00:00 UTC), &log.file("2024-04.jsonl")).await.unwrap();
    assert_eq!((summary.first_checkpoint, summary.through_checkpoint, summary.rows), (3, 5, 7));
    assert!(log.checkpoints().await.is_empty());
    let (report, previous_root) = credbroker::audit::checkpoints::verify_archive(&log.key, &log.file("2024-04.jsonl")).unwrap();
    assert!(report.intact(), "{report:?}");
    let first_root: Vec<u8> = sqlx::query_scalar("select root from audit_archives where through_checkpoint = 2").fetch_one(&log.pool).await.unwrap();
    assert_eq!(previous_root, hex::encode(first_root), "the second file links to the first");
    let late = log.add_sealed(&[datetime!(2024-06-01 00:00 UTC), datetime!(2024-06-02 00:00 UTC)], 3).await;
    assert_eq!(log.checkpoints().await, vec![6]);
    let report = log.store.verify_seals(&log.key, None).await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!((report.checkpoints, report.rows_checked, report.archived_through), (1, 2, Some(5)));

    // Tampering with what remains is still caught.
    let mut transaction = log.pool.begin().await.unwrap();
    sqlx::query("alter table audit_events disable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    sqlx::query("update audit_events set user_login = 'mallory' where id = $1").bind(late[1]).execute(&mut *transaction).await.unwrap();
    sqlx::query("alter table audit_events enable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    transaction.commit().await.unwrap();
    let report = log.store.verify_seals(&log.key, None).await.unwrap();
    assert_eq!(report.findings.len(), 1, "{report:?}");
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::Altered, Some(late[1])));

    // So is a row slipped into the archived range.
    let forged = Uuid::new_v4();
    sqlx::query("insert into audit_events (id, occurred_at, request_id, decision, tx) values ($1, now(), 'forged', 'denied', '1'::xid8)")
        .bind(forged)
        .execute(&log.pool)
        .await
        .unwrap();
    let report = log.store.verify_seals(&log.key, None).await.unwrap();
    assert!(report.findings.iter().any(|f| f.kind == FindingKind::InsertedOutOfOrder && f.event_id == Some(forged)), "{report:?}");
}

#[tokio::test]
async fn an_archive_that_would_split_a_checkpoint_is_refused() {
    let log = empty_log().await;
    log.add_sealed(&JANUARY, 3).await;
    let file = log.file("split.jsonl");

    // January 2 falls inside checkpoint 1 (January 1 to 3): nothing whole lies before it.
    let error = log.store.archive(&log.key, datetime!(2024-01-02 12:00 UTC), &file).await.unwrap_err();
    assert!(matches!(&error, SealError::Refused(message) if message.contains("split checkpoint 1")), "{error}");
    assert!(!file.exists(), "a refused archive leaves no file");
    assert_eq!((log.rows().await, log.checkpoints().await), (6, vec![1, 2]));

    // The database function refuses the same on its own, whoever calls it.
    let error = sqlx::query("select audit_archive(2, '2024-01-05T12:00:00Z', 'x')").execute(&log.pool).await.unwrap_err();
    assert!(error.to_string().contains("checkpoint 2 has rows at or after the cut"), "{error}");
    assert_eq!(log.rows().await, 6);

    // A cut inside checkpoint 2 takes checkpoint 1 only, and says checkpoint 2 straddles it.
    let summary = log.store.archive(&log.key, datetime!(2024-01-05 12:00 UTC), &file).await.unwrap();
    assert_eq!((summary.through_checkpoint, summary.rows, summary.straddling), (1, 3, Some(2)));
    assert_eq!((log.rows().await, log.checkpoints().await), (3, vec![2]));
    assert!(log.store.verify_seals(&log.key, None).await.unwrap().intact());
}

#[tokio::test]
async fn tampered_rows_are_not_archived_and_a_tampered_file_is_caught() {
    let log = empty_log().await;
    let ids = log.add_sealed(&JANUARY, 3).await;
    let mut transaction = log.pool.begin().await.unwrap();
    sqlx::query("alter table audit_events disable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    sqlx::query("update audit_events set user_login = 'mallory' where id = $1").bind(ids[1]).execute(&mut *transaction).await.unwrap();
    sqlx::query("alter table audit_events enable trigger audit_events_append_only").execute(&mut *transaction).await.unwrap();
    transaction.commit().await.unwrap();
    let file = log.file("tampered.jsonl");
    let error = log.store.archive(&log.key, datetime!(2024-02-01 00:00 UTC), &file).await.unwrap_err();
    assert!(matches!(&error, SealError::Refused(message) if message.contains(&ids[1].to_string()) && message.contains("altered")), "{error}");
    assert!(!file.exists());
    assert_eq!(log.rows().await, 6);

    let log = empty_log().await;
    let ids = log.add_sealed(&JANUARY, 3).await;
    let file = log.file("2024-01.jsonl");
    log.store.archive(&log.key, datetime!(2024-02-01 00:00 UTC), &file).await.unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    // Row 4's column and its claims name user-4; rewrite both, as a forger would.
    let needle = "\"user_login\":\"user-4\"";
    assert_eq!(text.matches(needle).count(), 2, "{text}");
    std::fs::write(&file, text.replace(needle, "\"user_login\":\"mallory\"")).unwrap();
    let (report, _) = credbroker::audit::checkpoints::verify_archive(&log.key, &file).unwrap();
    assert_eq!((report.findings[0].kind.clone(), report.findings[0].event_id), (FindingKind::Altered, Some(ids[4])), "{report:?}");
    // A checkpoint line dropped from the file.
    let lines: Vec<&str> = text.lines().filter(|line| !line.starts_with("{\"checkpoint\"") || !line.contains("\"number\":2,")).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (report, _) = credbroker::audit::checkpoints::verify_archive(&log.key, &file).unwrap();
    assert!(!report.intact(), "{report:?}");
}

#[tokio::test]
async fn only_the_owner_archives_and_nothing_else_removes_sealed_rows() {
    let log = empty_log().await;
    let ids = log.add_sealed(&JANUARY, 3).await;
    let mut connection = log.pool.acquire().await.unwrap();
    sqlx::query("set role credbroker_broker").execute(&mut *connection).await.unwrap();
    for statement in [
        "select audit_archive(1, now(), 'x')",
        "insert into audit_archives (through_checkpoint, first_checkpoint, last_tx, last_id, root, key_id, signature, cut, row_count, archive_sha256)
         values (1, 1, '1', gen_random_uuid(), '', '', '', now(), 1, '')",
        "delete from audit_events",
        "delete from audit_checkpoints",
    ] {
        let error = sqlx::query(statement).execute(&mut *connection).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{statement}: {error}");
    }
    sqlx::query("reset role").execute(&mut *connection).await.unwrap();
    drop(connection);

    // The owner too is stopped by the append-only guard outside audit_archive().
    for statement in ["delete from audit_events where id = $1", "update audit_events set detail = 'x' where id = $1", "truncate audit_events"] {
        let query = sqlx::query(statement);
        let query = if statement.contains("$1") { query.bind(ids[0]) } else { query };
        let error = query.execute(&log.pool).await.unwrap_err();
        assert!(error.to_string().contains("audit_events is append-only"), "{statement}: {error}");
    }
    let error = sqlx::query("delete from audit_checkpoints where number = 1").execute(&log.pool).await.unwrap_err();
    assert!(error.to_string().contains("audit_checkpoints is append-only"), "{error}");
    let error = sqlx::query("delete from audit_archives").execute(&log.pool).await.unwrap_err();
    assert!(error.to_string().contains("audit_archives is append-only"), "{error}");
    assert_eq!(log.rows().await, 6);
    assert!(log.store.verify_seals(&log.key, None).await.unwrap().intact());
}

/// The CHECKs of `audit_events` and `token_use_counts` hold for every writer, the broker's role
/// included: every decision the log knows is written, and a value outside them, an issued row
/// without its credential's fingerprint, or a count below its bound is refused (SQLSTATE 23514).
#[tokio::test]
async fn the_log_holds_only_what_its_checks_allow() {
    let log = empty_log().await;
    let mut connection = log.pool.acquire().await.unwrap();
    sqlx::query("set role credbroker_broker").execute(&mut *connection).await.unwrap();
    let audit_row = |decision: &str, occurrences: i32, overshoot_seconds: Option<i32>, credential_sha256: Option<&str>| {
        sqlx::query(
            "insert into audit_events (id, occurred_at, request_id, decision, occurrences, overshoot_seconds, credential_sha256, expires_at)
             values (gen_random_uuid(), now(), 'check', $1, $2, $3, $4, now() + interval '1 hour')",
        )
        .bind(decision.to_owned())
        .bind(occurrences)
        .bind(overshoot_seconds)
        .bind(credential_sha256.map(str::to_owned))
    };
    let token_use = |uses: i32, max_uses: i32, last_claimed: i32| {
        sqlx::query(
            "insert into token_use_counts (issuer, jti, role, uses, max_uses, last_claimed, token_expires_at)
             values ('https://gitlab.example.com', gen_random_uuid()::text, 'r', $1, $2, $3, now())",
        )
        .bind(uses)
        .bind(max_uses)
        .bind(last_claimed)
    };
    for decision in ["issued", "denied", "failed", "revoked", "revoke_failed", "admin_request", "audit_read"] {
        audit_row(decision, 1, Some(1), Some("fingerprint")).execute(&mut *connection).await.unwrap_or_else(|error| panic!("{decision}: {error}"));
    }
    token_use(1, 1, 0).execute(&mut *connection).await.unwrap();

    let refused = [
        ("an unknown decision", audit_row("granted", 1, None, Some("fingerprint"))),
        ("a decision in another case", audit_row("Issued", 1, None, Some("fingerprint"))),
        ("no occurrence", audit_row("denied", 0, None, None)),
        ("no overshoot", audit_row("issued", 1, Some(0), Some("fingerprint"))),
        ("a negative overshoot", audit_row("issued", 1, Some(-5), Some("fingerprint"))),
        ("an issued row without its credential", audit_row("issued", 1, None, None)),
        ("no use taken", token_use(0, 1, 0)),
        ("no use allowed", token_use(1, 0, 0)),
        ("a negative count claimed", token_use(1, 1, -1)),
    ];
    for (what, statement) in refused {
        let error = statement.execute(&mut *connection).await.expect_err(what);
        assert_eq!(error.as_database_error().and_then(|error| error.code()).as_deref(), Some("23514"), "{what}: {error}");
    }
    sqlx::query("reset role").execute(&mut *connection).await.unwrap();
    drop(connection);
    assert_eq!(log.rows().await, 7, "only the rows the checks allow");
}
