//! The query half of `bench/audit_scale`: times the security team's questions through the
//! real code path (`IssuanceFilter::parse` + `PgAudit::query_issuances`, what the API and
//! `credbroker audit query` run) against a table the script filled, and a baseline measured in
//! the same run: one row by primary key through `PgAudit::issuance_lifecycle` (the API's
//! `GET /v1/issuances/{id}`), which is a round trip, a plan and a decode with no search.
//!
//!   audit_scale measure --database-url URL [--repeat N] [--out FILE] [--only PREFIX]
//!                                                                     table on stdout, JSON lines to FILE;
//!                                                                     only questions named PREFIX...
//!   audit_scale explain --database-url URL                            each question 7 times, after a marker
//!                                                                     in the server log (`bench question: NAME`)
//!
//! One pool with two connections, reused, as a broker replica reuses its connections: were the
//! query a named prepared statement, Postgres could switch it to a generic plan after five
//! executions, and a question that is only fast with a custom plan would show it here. Two,
//! because the `/audit` page asks its table and its chart at once (`tokio::try_join!` in
//! `src/http/audit_page/mod.rs`), and "page view" questions do the same.

use std::time::{Duration, Instant};

use credbroker::audit::query::IssuanceFilter;
use credbroker::audit::PgAudit;
use secrecy::SecretString;
use serde_json::json;
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

/// The target each question must meet (issue 7, "Scale").
const TARGET_MS: f64 = 200.0;

struct Question {
    name: &'static str,
    pairs: Vec<(&'static str, String)>,
    asks: Asks,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Asks {
    /// A page of rows (`query_issuances`): the API, the CLI, the page's table.
    Rows,
    /// The `/audit` page's chart (`issuance_timeline`).
    Chart,
    /// What the `/audit` page does for one view: record the read (an `audit_read` row, one
    /// commit), then ask its table and its chart at once.
    PageView,
}

struct Targets {
    busiest_project: String,
    typical_project: String,
    busiest_group: String,
    job_id: String,
    sha: String,
    pipeline_id: String,
    credential_sha256: String,
    baseline_id: Uuid,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mode = args.first().cloned().unwrap_or_default();
    let option = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let Some(url) = option("--database-url") else {
        eprintln!("usage: audit_scale measure|explain --database-url URL [--repeat N] [--out FILE] [--only PREFIX]");
        std::process::exit(2);
    };
    let repeat: usize = option("--repeat").map(|r| r.parse().expect("--repeat N")).unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = PgAudit::connect(&SecretString::from(url), 2, Duration::from_secs(30)).expect("connect");
        let targets = targets(&store).await;
        let only = option("--only").unwrap_or_default();
        let questions: Vec<Question> = questions(&targets).into_iter().filter(|q| q.name.starts_with(only.as_str())).collect();
        match mode.as_str() {
            "measure" => measure(&store, &targets, &questions, repeat, option("--out")).await,
            "explain" => explain(&store, &targets, &questions).await,
            _ => {
                eprintln!("unknown mode {mode:?}: measure or explain");
                std::process::exit(2);
            }
        }
    });
}

/// Values to ask about, picked from the generated rows (bench/audit_scale.sql): the busiest
/// project and group by construction, a project of median size, and one job, commit,
/// pipeline and credential from a sample.
async fn targets(store: &PgAudit) -> Targets {
    let pool = store.pool();
    let typical_project: String = sqlx::query_scalar(
        "with sample as (select project_path, count(*) as n from audit_events tablesample system (1) repeatable (7)
                         where project_path is not null group by 1)
         select project_path from sample order by n, project_path offset (select count(*) / 2 from sample) limit 1",
    )
    .fetch_one(pool)
    .await
    .expect("a typical project");
    let row = sqlx::query(
        "select job_id, sha, pipeline_id, credential_sha256 from audit_events tablesample system (0.1) repeatable (7)
         where decision = 'issued' and occurred_at > now() - interval '60 days' limit 1",
    )
    .fetch_one(pool)
    .await
    .expect("an issued row");
    let baseline_id: Uuid =
        sqlx::query_scalar("select id from audit_events tablesample system (0.1) repeatable (7) where decision = 'denied' limit 1")
            .fetch_one(pool)
            .await
            .expect("a denied row");
    Targets {
        busiest_project: "grp-000/team-0/svc-0".into(),
        typical_project,
        busiest_group: "grp-000".into(),
        job_id: row.get("job_id"),
        sha: row.get("sha"),
        pipeline_id: row.get("pipeline_id"),
        credential_sha256: row.get("credential_sha256"),
        baseline_id,
    }
}

fn questions(t: &Targets) -> Vec<Question> {
    let question =
        |name, pairs: &[(&'static str, &str)], asks| Question { name, pairs: pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(), asks };
    let q = |name, pairs: &[(&'static str, &str)]| question(name, pairs, Asks::Rows);
    let group_glob = format!("{}/**", t.busiest_group);
    vec![
        q("project exact, busiest, last 7d", &[("project_path", &t.busiest_project), ("since", "7d")]),
        q("project exact, busiest, 60d..53d ago", &[("project_path", &t.busiest_project), ("since", "60d"), ("until", "53d")]),
        q("project exact, typical, last 30d", &[("project_path", &t.typical_project), ("since", "30d")]),
        q("project glob group/**, last 7d", &[("project_path", &group_glob), ("since", "7d")]),
        q("project glob group/**, 60d..53d ago", &[("project_path", &group_glob), ("since", "60d"), ("until", "53d")]),
        q("job id", &[("job_id", &t.job_id)]),
        q("sha prefix (7 hex)", &[("sha", &t.sha[..7])]),
        q("sha full", &[("sha", &t.sha)]),
        q("denied, last hour", &[("decision", "denied"), ("since", "1h")]),
        q("pipeline id", &[("pipeline_id", &t.pipeline_id)]),
        q("credential_sha256", &[("credential_sha256", &t.credential_sha256)]),
        // Not one of issue 7's questions: a filter no index serves, over a past week (see
        // bench/README.md, "What is not fast").
        q("user login, 60d..53d ago", &[("user_login", "user-7"), ("since", "60d"), ("until", "53d")]),
        // The second page is asked with the cursor the first page returned (see `run`).
        q("second page: group/**, last 30d", &[("project_path", &group_glob), ("since", "30d")]),
        // What the /audit page asks on top: its table unfiltered, and its chart (7 days by
        // default) over everything (from migration 0018's rollup) and over one project (from
        // the rows); then whole views, table and chart together as the page asks them: the
        // default view (issue 18: under 200 ms at p95), one over 30 days, and a project's.
        q("page table: no filter, newest 100", &[]),
        question("page chart: everything, last 7d", &[], Asks::Chart),
        question("page chart: everything, last 30d", &[("since", "30d")], Asks::Chart),
        question("page chart: busiest project, last 7d", &[("project_path", &t.busiest_project)], Asks::Chart),
        question("page view: default (no filter, 7d)", &[], Asks::PageView),
        question("page view: everything, last 30d", &[("since", "30d")], Asks::PageView),
        question("page view: busiest project, last 7d", &[("project_path", &t.busiest_project)], Asks::PageView),
    ]
}

/// One question through the real code path; the second-page question first fetches page one
/// (untimed) for its cursor.
async fn prepare(store: &PgAudit, question: &Question) -> IssuanceFilter {
    let now = OffsetDateTime::now_utc();
    let parse = |pairs: &[(&'static str, String)]| IssuanceFilter::parse(pairs.iter().map(|(k, v)| (*k, v.as_str())), now).expect("valid filter");
    let filter = parse(&question.pairs);
    if !question.name.starts_with("second page") {
        return filter;
    }
    let first = store.query_issuances(&filter).await.expect("first page");
    let cursor = first.next_cursor.expect("the big result has a second page");
    let mut pairs = question.pairs.clone();
    pairs.push(("cursor", cursor));
    parse(&pairs)
}

/// Milliseconds and rows (or chart points; for a page view, rows plus points) returned; None
/// when the broker's statement timeout (10 s) cut it off.
async fn timed_query(store: &PgAudit, filter: &IssuanceFilter, asks: Asks) -> Option<(f64, usize)> {
    let started = Instant::now();
    let returned = match asks {
        Asks::Rows => store.query_issuances(filter).await.map(|page| page.items.len()),
        Asks::Chart => store.issuance_timeline(filter, OffsetDateTime::now_utc()).await.map(|timeline| timeline.points.len()),
        Asks::PageView => match store.record_direct_read("bench/audit_scale: page view").await {
            Ok(_) => tokio::try_join!(store.query_issuances(filter), store.issuance_timeline(filter, OffsetDateTime::now_utc()))
                .map(|(page, timeline)| page.items.len() + timeline.points.len()),
            Err(error) => Err(error),
        },
    };
    match returned {
        Ok(returned) => Some((started.elapsed().as_secs_f64() * 1000.0, returned)),
        Err(error) if error.to_string().contains("statement timeout") => None,
        Err(error) => panic!("query: {error}"),
    }
}

async fn timed_baseline(store: &PgAudit, id: Uuid) -> f64 {
    let started = Instant::now();
    let found = store.issuance_lifecycle(id).await.expect("baseline");
    assert!(found.is_some());
    started.elapsed().as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn measure(store: &PgAudit, targets: &Targets, questions: &[Question], repeat: usize, out: Option<String>) {
    let rows: i64 =
        sqlx::query_scalar("select reltuples::bigint from pg_class where relname = 'audit_events'").fetch_one(store.pool()).await.unwrap();
    // The baseline, interleaved with the questions below so that both see the same machine.
    let mut baseline = Vec::new();
    timed_baseline(store, targets.baseline_id).await;
    let mut results = Vec::new();
    for question in questions {
        let filter = prepare(store, question).await;
        // A question the statement timeout cuts off is reported as such and not repeated.
        let Some((first_ms, returned)) = timed_query(store, &filter, question.asks).await else {
            results.push((question, f64::INFINITY, 0, f64::INFINITY, f64::INFINITY));
            continue;
        };
        let mut samples = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            samples.push(timed_query(store, &filter, question.asks).await.map_or(f64::INFINITY, |(ms, _)| ms));
            baseline.push(timed_baseline(store, targets.baseline_id).await);
        }
        samples.sort_by(f64::total_cmp);
        results.push((question, first_ms, returned, percentile(&samples, 0.5), percentile(&samples, 0.95)));
    }
    baseline.sort_by(f64::total_cmp);
    let (base_p50, base_p95) = (percentile(&baseline, 0.5), percentile(&baseline, 0.95));
    println!("audit_events: ~{rows} rows; {repeat} timed runs per question after one untimed-for-percentiles first run");
    println!("baseline (one row by primary key, issuance_lifecycle): p50 {base_p50:.2} ms, p95 {base_p95:.2} ms over {} runs\n", baseline.len());
    println!(
        "{:<40}{:>6}{:>10}{:>9}{:>9}{:>12}{:>12}  target {TARGET_MS:.0} ms",
        "question", "rows", "first ms", "p50 ms", "p95 ms", "p50/base", "p95/base"
    );
    let mut lines = Vec::new();
    let mut missed = 0;
    for (question, first_ms, returned, p50, p95) in &results {
        let pass = *p95 < TARGET_MS;
        missed += usize::from(!pass);
        println!(
            "{:<40}{:>6}{:>10.1}{:>9.2}{:>9.2}{:>12.1}{:>12.1}  {}",
            question.name,
            returned,
            first_ms,
            p50,
            p95,
            p50 / base_p50,
            p95 / base_p95,
            if pass { "pass" } else { "MISS" }
        );
        lines.push(json!({
            "question": question.name, "filter": question.pairs, "rows_returned": returned,
            "first_ms": first_ms.is_finite().then_some(*first_ms), "p50_ms": p50.is_finite().then_some(*p50),
            "p95_ms": p95.is_finite().then_some(*p95), "timed_out": !p95.is_finite(), "baseline_p50_ms": base_p50, "baseline_p95_ms": base_p95,
            "ratio_p50": (p50 / base_p50).is_finite().then_some(p50 / base_p50),
            "ratio_p95": (p95 / base_p95).is_finite().then_some(p95 / base_p95), "pass": pass, "table_rows": rows,
        }));
    }
    println!(
        "\n{} of {} questions under {TARGET_MS:.0} ms at p95 (inf: cut off by the 10 s statement timeout)",
        results.len() - missed,
        results.len()
    );
    if let Some(out) = out {
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(&out, text).expect("write results");
    }
}

async fn explain(store: &PgAudit, targets: &Targets, questions: &[Question]) {
    for question in questions {
        sqlx::query(&format!("do $$ begin raise log 'bench question: {}'; end $$", question.name.replace('\'', "")))
            .execute(store.pool())
            .await
            .unwrap();
        let filter = prepare(store, question).await;
        // Seven runs: the plan Postgres settles on after its five custom plans is the last one logged.
        for _ in 0..7 {
            if timed_query(store, &filter, question.asks).await.is_none() {
                break;
            }
        }
    }
    sqlx::query("do $$ begin raise log 'bench question: baseline'; end $$").execute(store.pool()).await.unwrap();
    timed_baseline(store, targets.baseline_id).await;
    sqlx::query("do $$ begin raise log 'bench question: end'; end $$").execute(store.pool()).await.unwrap();
}
