//! The AWS STS peer: a real `moto` server (PyPI `moto[server]`, installed by scripts/test.sh)
//! on a free loopback port, a recording proxy in front of it, and the broker configured with
//! an `aws_sts` backend pointing at the proxy.
//!
//! moto accepts requests real STS refuses (a 1 s duration, 60 tags, an oversized policy),
//! so the tests do not trust moto to complain: the proxy keeps every request exactly as the
//! SDK sent it, and [`assert_sts_would_accept`] holds each one to STS's documented limits.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{TestApp, POLICIES};

/// The broker's own (fake) AWS identity in these tests. Never a real key.
pub const BROKER_ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
pub const BROKER_SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYBROKERSECRET";

pub struct Moto {
    pub url: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// `env`: moto settings, e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to check every request's
    /// signature and access key the way STS does.
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        // A port found free can be taken by another test's server before moto binds it: moto
        // then ends at once, and what answers on the port is not ours. Try another port.
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new("python3");
            command
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            for (name, value) in env {
                command.env(name, value);
            }
            let child = command.spawn().expect("python3 -m moto.server (scripts/test.sh installs moto[server])");
            let mut moto = Self { url: format!("http://127.0.0.1:{port}"), child };
            if moto.answers().await {
                return moto;
            }
        }
        panic!("moto did not start on five ports in a row");
    }

    /// Whether this moto came up and answers; false once it has ended.
    async fn answers(&mut self) -> bool {
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok(response) = reqwest::get(format!("{}/moto-api/", self.url)).await {
                if response.status().is_success() {
                    // Another test's moto, holding the port, answers before this one has
                    // found the port taken and ended: give it the time to.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return self.child.try_wait().unwrap().is_none();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not start on {}", self.url);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One request as the SDK put it on the wire, its form body decoded.
#[derive(Debug, Clone)]
pub struct StsRequest {
    pub headers: Vec<(String, String)>,
    pub params: Vec<(String, String)>,
}

impl StsRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// `Tags.member.N.Key` / `.Value` pairs, in order.
    pub fn tags(&self) -> Vec<(String, String)> {
        (1..)
            .map_while(|n| {
                let key = self.param(&format!("Tags.member.{n}.Key"))?;
                let value = self.param(&format!("Tags.member.{n}.Value")).unwrap_or_default();
                Some((key.to_owned(), value.to_owned()))
            })
            .collect()
    }
}

/// A TCP tee: bytes pass through unchanged (so SigV4 signatures still verify at moto), and
/// a copy of what the client sent is parsed into requests.
pub struct RecordingProxy {
    pub url: String,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl RecordingProxy {
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent: Arc<Mutex<Vec<u8>>> = Arc::default();
        let recorded = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, recorded) = (upstream.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = async {
                        let mut buffer = [0u8; 16 * 1024];
                        while let Ok(n) = client_read.read(&mut buffer).await {
                            if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                            recorded.lock().unwrap().extend_from_slice(&buffer[..n]);
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let responses = async {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    };
                    tokio::join!(requests, responses);
                });
            }
        });
        Self { url, sent }
    }

    /// Every request so far. Connections are kept alive, so requests are split by their
    /// Content-Length as HTTP/1.1 frames them.
    pub fn requests(&self) -> Vec<StsRequest> {
        let bytes = self.sent.lock().unwrap().clone();
        let mut requests = Vec::new();
        let mut rest = &bytes[..];
        while let Some(end) = rest.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end]).into_owned();
            let headers: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            let length: usize = headers.iter().find(|(name, _)| name == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let body_start = end + 4;
            let body = &rest[body_start..(body_start + length).min(rest.len())];
            let params = url::form_urlencoded::parse(body).into_owned().collect();
            requests.push(StsRequest { headers, params });
            rest = &rest[(body_start + length).min(rest.len())..];
        }
        requests
    }

    pub fn assume_role_requests(&self) -> Vec<StsRequest> {
        self.requests().into_iter().filter(|request| request.param("Action") == Some("AssumeRole")).collect()
    }
}

/// STS's documented limits for AssumeRole (REFERENCE.md, "AWS STS"), checked on the request
/// as sent: what moto would let through but STS would refuse.
pub fn assert_sts_would_accept(request: &StsRequest) {
    let name_ok =
        |value: &str| (2..=64).contains(&value.chars().count()) && value.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    let duration: u32 = request.param("DurationSeconds").expect("DurationSeconds always sent").parse().unwrap();
    assert!((900..=43_200).contains(&duration), "DurationSeconds {duration} outside STS's 900..=43200");
    let session_name = request.param("RoleSessionName").expect("RoleSessionName is required");
    assert!(name_ok(session_name), "RoleSessionName {session_name:?}");
    if let Some(identity) = request.param("SourceIdentity") {
        assert!(name_ok(identity) && !identity.starts_with("aws:"), "SourceIdentity {identity:?}");
    }
    let arn = request.param("RoleArn").expect("RoleArn is required");
    let (prefix, name) = arn.rsplit_once(":role/").unwrap_or_else(|| panic!("RoleArn {arn:?}"));
    assert!(prefix.starts_with("arn:aws:iam::") && prefix.len() == "arn:aws:iam::".len() + 12, "RoleArn {arn:?}");
    assert!(name.split('/').all(name_ok_segment) && name.rsplit('/').next().unwrap().len() <= 64, "RoleArn {arn:?}");
    if let Some(policy) = request.param("Policy") {
        assert!(policy.chars().count() <= 2048, "Policy of {} characters", policy.chars().count());
        serde_json::from_str::<serde_json::Value>(policy).expect("Policy is JSON");
    }
    let tags = request.tags();
    assert!(tags.len() <= 50, "{} tags", tags.len());
    let tag_char = |c: char| !c.is_control() && (c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c));
    for (key, value) in &tags {
        assert!((1..=128).contains(&key.chars().count()) && key.chars().all(tag_char), "tag key {key:?}");
        assert!(value.chars().count() <= 256 && value.chars().all(tag_char), "tag value {value:?}");
    }
}

fn name_ok_segment(segment: &str) -> bool {
    !segment.is_empty() && segment.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

/// The broker's AWS identity for the SDK's standard chain, from the environment only: no
/// shared config files or instance metadata on a developer's machine can leak in. Each test
/// runs in its own process (nextest), so setting the environment is contained.
pub fn broker_aws_environment() -> [(&'static str, &'static str); 6] {
    [
        ("AWS_ACCESS_KEY_ID", BROKER_ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", BROKER_SECRET_ACCESS_KEY),
        ("AWS_CONFIG_FILE", "/nonexistent/credbroker-test-aws-config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credbroker-test-aws-credentials"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_REGION", "eu-west-1"),
    ]
}

/// The broker of [`TestApp::spawn`], plus `[backends.aws]` (type aws_sts) pointing at
/// `endpoint_url`, and `policies` next to the Kafka test roles.
pub async fn spawn_with_aws(endpoint_url: &str, backend_extra: &str, policies: &str) -> TestApp {
    for (name, value) in broker_aws_environment() {
        std::env::set_var(name, value);
    }
    let tables = format!("[backends.aws]\ntype = \"aws_sts\"\nregion = \"eu-west-1\"\nendpoint_url = \"{endpoint_url}\"\n{backend_extra}\n");
    TestApp::spawn_full("", &tables, &format!("{POLICIES}\n{policies}"), None).await
}
