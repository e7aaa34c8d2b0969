//! `/metrics`, scraped by a real Prometheus (Debian's package, started here on loopback with
//! its own scrape configuration and README's alert rules): exchanges are counted by role,
//! backend, decision and code as PromQL sees them, nothing a request says becomes a label,
//! and `metrics_listen` keeps the endpoint off the public port.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, TestApp};
use serde_json::{json, Value};

/// A Prometheus server with its own data directory, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    client: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second, with `rules` as its rule file.
    async fn start(dir: &Path, target: &str, rules: &str) -> Self {
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: credbroker\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = common::moto::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (scripts/test.sh installs Debian's package)");
        let prometheus = Self { child, url: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() };
        let log = dir.join("prometheus.log");
        eventually("Prometheus is ready", Duration::from_secs(30), async || {
            prometheus.client.get(format!("{}/-/ready", prometheus.url)).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(std::fs::read_to_string(&log).is_ok());
        prometheus
    }

    /// The instant vector of a PromQL query: (labels, value) per series.
    async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let answer: Value =
            self.client.get(format!("{}/api/v1/query", self.url)).query(&[("query", promql)]).send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| (series["metric"].clone(), series["value"][1].as_str().unwrap().parse().unwrap()))
            .collect()
    }

    /// The value of a query that yields one series, once Prometheus has scraped enough.
    async fn wait_for(&self, promql: &str, expected: f64) {
        let mut last = Vec::new();
        for _ in 0..60 {
            last = self.query(promql).await;
            if last.len() == 1 && last[0].1 == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{promql}: expected {expected}, Prometheus has {last:?}");
    }
}

/// README's alert rules, the YAML block that follows `# credbroker-alerts.yml`.
fn readme_alert_rules() -> String {
    let readme = std::fs::read_to_string(common::repo_path("README.md")).unwrap();
    let start = readme.find("# credbroker-alerts.yml\n").expect("README has the alert rules block");
    let block = &readme[start..];
    block[..block.find("```").unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_counts_exchanges_by_role_backend_decision_and_code() {
    let metrics_port = common::moto::free_port();
    let app = TestApp::spawn_with(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\""), None).await;
    let prometheus = Prometheus::start(&app.dir.0, &format!("127.0.0.1:{metrics_port}"), &readme_alert_rules()).await;

    for _ in 0..3 {
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
        assert_eq!(status, 200, "{body}");
    }
    // A role nobody declared, under a name an attacker chose: counted, but never a label.
    for _ in 0..2 {
        let (status, _, _) = app.exchange(&app.issuer.token(), json!({"role": "attacker-chosen-role"})).await;
        assert_eq!(status, 403);
    }
    // A declared role whose bindings this job does not meet.
    let (status, _, _) = app.exchange(&app.issuer.token_with(json!({"job_project_path": "other/project"})), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 403);
    // Not a token at all.
    let (status, _, _) = app.exchange("not-a-jwt", json!({"role": "orders-producer"})).await;
    assert_eq!(status, 401);

    prometheus.wait_for(r#"credbroker_exchanges_total{role="orders-producer",backend="kafka",decision="issued",code="none"}"#, 3.0).await;
    prometheus.wait_for(r#"credbroker_exchanges_total{role="unknown",backend="none",decision="denied",code="access_denied"}"#, 2.0).await;
    prometheus.wait_for(r#"credbroker_exchanges_total{role="orders-producer",decision="denied",code="access_denied"}"#, 1.0).await;
    prometheus.wait_for(r#"credbroker_exchanges_total{decision="denied",code="invalid_token"}"#, 1.0).await;
    assert!(prometheus.query(r#"{role="attacker-chosen-role"}"#).await.is_empty(), "a request created a series");
    prometheus.wait_for("sum(credbroker_exchanges_total)", 7.0).await;

    // A histogram with buckets: every exchange observed once, quantiles computable.
    prometheus.wait_for(r#"credbroker_exchange_duration_seconds_count{decision="issued"}"#, 3.0).await;
    prometheus.wait_for("sum(credbroker_exchange_duration_seconds_count)", 7.0).await;
    let buckets = prometheus.query(r#"credbroker_exchange_duration_seconds_bucket{decision="issued"}"#).await;
    assert!(buckets.len() > 10, "{buckets:?}");
    let p99 = prometheus.query(r#"histogram_quantile(0.99, credbroker_exchange_duration_seconds_bucket{decision="issued"})"#).await;
    assert!(p99[0].1 > 0.0 && p99[0].1 < 20.0, "{p99:?}");
    prometheus.wait_for(r#"credbroker_mint_duration_seconds_count{backend="kafka"}"#, 3.0).await;

    // Each exchange's row was committed; none failed; nothing is due or waiting.
    let rows = prometheus.query("sum(credbroker_audit_batch_rows_sum)").await;
    assert!(rows[0].1 >= 7.0, "{rows:?}");
    // Each issued exchange claimed its token use through the claim batches.
    let claims = prometheus.query("sum(credbroker_token_claim_batch_size_sum)").await;
    assert!(claims[0].1 >= 3.0, "{claims:?}");
    prometheus.wait_for("credbroker_audit_write_failures_total", 0.0).await;
    prometheus.wait_for("credbroker_revocations_due", 0.0).await;
    prometheus.wait_for("credbroker_outbox_backlog", 0.0).await;
    prometheus.wait_for("credbroker_audit_timeline_lag_seconds < bool 60", 1.0).await;
    prometheus.wait_for(r#"credbroker_jwks_fetches_total{issuer="gitlab",outcome="ok"}"#, 1.0).await;

    // README's alert rules load, evaluate, and do not fire on a healthy broker.
    let rules: Value = prometheus.client.get(format!("{}/api/v1/rules", prometheus.url)).send().await.unwrap().json().await.unwrap();
    let loaded: Vec<(String, String)> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("{rules}"))
        .iter()
        .map(|rule| (rule["name"].as_str().unwrap().to_owned(), rule["health"].as_str().unwrap().to_owned()))
        .collect();
    let names: Vec<&str> = loaded.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["CredbrokerAuditWritesFailing", "CredbrokerRevocationsFailing", "CredbrokerAuditChartBehind"]);
    eventually("the rules are evaluated", Duration::from_secs(15), async || {
        let rules: Value = prometheus.client.get(format!("{}/api/v1/rules", prometheus.url)).send().await.unwrap().json().await.unwrap();
        rules["data"]["groups"][0]["rules"].as_array().unwrap().iter().all(|rule| rule["health"] == "ok" && rule["state"] == "inactive")
    })
    .await;

    // metrics_listen keeps /metrics off the public listener.
    let public = app.client.get(format!("{}/metrics", app.url)).send().await.unwrap();
    assert_eq!(public.status(), 404);
}

#[tokio::test]
async fn without_metrics_listen_the_endpoint_is_on_the_listener_and_needs_no_token() {
    let app = TestApp::spawn().await;
    let (status, _, _) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 200);
    let response = app.client.get(format!("{}/metrics", app.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    assert!(text.contains(r#"credbroker_exchanges_total{role="orders-producer",backend="kafka",decision="issued",code="none"} 1"#), "{text}");
    assert!(text.contains("# TYPE credbroker_exchange_duration_seconds histogram"), "{text}");
    assert!(text.ends_with("# EOF\n"));
}
