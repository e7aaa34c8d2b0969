//! TLS on the listener, with certificates generated here: real handshakes from reqwest, curl
//! and the `credbroker` CLI; mutual TLS with `client_ca_file`; the refusal of plain HTTP on a
//! non-loopback address; and a certificate swapped on SIGHUP while a connection stays open.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::TestApp;
use credbroker::config::Config;
use credbroker::startup::{Application, ServeOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

/// A CA and what it signed, as PEM.
struct Authority {
    certificate: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.self_signed(&key).unwrap();
        Self { certificate, key }
    }

    /// (certificate PEM, private key PEM) for a server on loopback, or a client named `name`.
    fn issue(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names = match purpose {
            ExtendedKeyUsagePurpose::ServerAuth => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            _ => Vec::new(),
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let certificate = params.signed_by(&key, &self.certificate, &self.key).unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.certificate.pem()
    }
}

/// Writes a server certificate (and the CA's) into `dir`: `ca.pem`, `server.pem`, `server.key`.
fn write_server_files(dir: &Path, authority: &Authority) {
    let (certificate, key) = authority.issue("credbroker", ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(dir.join("ca.pem"), authority.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), certificate).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
}

const TLS_TABLE: &str = "[tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\n";

/// An in-process broker whose listener speaks TLS with a certificate from a fresh CA.
async fn spawn_tls(extra_tls: &str) -> (TestApp, Authority) {
    let authority = Authority::new("credbroker test CA");
    // spawn_full writes the config into its own directory, so the files must be there first:
    // the table names absolute paths in a directory of ours.
    let files = common::temp_dir();
    write_server_files(&files.0, &authority);
    let table = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra_tls}",
        files.0.join("server.pem").display(),
        files.0.join("server.key").display()
    );
    let app = TestApp::spawn_full("", &table, common::POLICIES, None).await;
    std::fs::rename(files.0.join("ca.pem"), app.dir.0.join("ca.pem")).unwrap();
    (app, authority)
}

fn client_trusting(authority: &Authority) -> reqwest::ClientBuilder {
    reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(authority.pem().as_bytes()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn reqwest_curl_and_the_cli_exchange_over_tls_with_the_ca_they_are_given() {
    let (app, authority) = spawn_tls("").await;
    assert!(app.url.starts_with("https://127.0.0.1:"), "{}", app.url);
    let token = app.issuer.token();

    // reqwest, trusting the test CA.
    let client = client_trusting(&authority).build().unwrap();
    let response =
        client.post(format!("{}/v1/credentials", app.url)).bearer_auth(&token).json(&json!({"role": "orders-producer"})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["role"], "orders-producer", "{body}");

    // Without the CA the handshake fails: nothing falls back to plain HTTP.
    let error = reqwest::Client::new().get(format!("{}/healthz", app.url)).send().await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    let plain = app.url.replacen("https://", "http://", 1);
    let plain_answer = reqwest::Client::new().get(format!("{plain}/healthz")).send().await;
    assert!(plain_answer.is_err() || plain_answer.unwrap().status() != 200, "plain HTTP must not be served on the TLS port");

    // curl.
    let ca = app.dir.0.join("ca.pem");
    let url = app.url.clone();
    let curl = tokio::task::spawn_blocking({
        let (ca, url, token) = (ca.clone(), url.clone(), app.issuer.token());
        move || {
            std::process::Command::new("curl")
                .args(["--silent", "--show-error", "--fail-with-body", "--cacert"])
                .arg(&ca)
                .args(["-H", &format!("Authorization: Bearer {token}"), "-H", "Content-Type: application/json"])
                .args(["--data", r#"{"role":"orders-producer"}"#])
                .arg(format!("{url}/v1/credentials"))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(curl.status.success(), "{}{}", String::from_utf8_lossy(&curl.stdout), String::from_utf8_lossy(&curl.stderr));
    let body: serde_json::Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(body["role"], "orders-producer");
    let untrusted = std::process::Command::new("curl").args(["--silent", "--show-error"]).arg(format!("{url}/healthz")).output().unwrap();
    assert!(!untrusted.status.success(), "curl without the CA must fail the handshake");

    // The CLI, with --ca-file and with CREDBROKER_CA_FILE; and without either.
    let cli = |args: Vec<String>, env: Vec<(&'static str, String)>| {
        let token = app.issuer.token();
        let mut command = std::process::Command::new(BIN);
        command.arg("exchange").args(args).env("CREDBROKER_ID_TOKEN", token).env_remove("CREDBROKER_CA_FILE");
        command.envs(env);
        command.output().unwrap()
    };
    let base = vec!["--url".to_owned(), url.clone(), "--role".to_owned(), "orders-producer".to_owned()];
    let with_flag = cli([base.clone(), vec!["--ca-file".into(), ca.display().to_string()]].concat(), vec![]);
    assert!(with_flag.status.success(), "{}", String::from_utf8_lossy(&with_flag.stderr));
    assert!(String::from_utf8_lossy(&with_flag.stdout).contains("export KAFKA_OAUTHBEARER_TOKEN='"));
    let with_env = cli(base.clone(), vec![("CREDBROKER_CA_FILE", ca.display().to_string())]);
    assert!(with_env.status.success(), "{}", String::from_utf8_lossy(&with_env.stderr));
    let without = cli(base.clone(), vec![]);
    assert_eq!(without.status.code(), Some(3), "unreachable (untrusted certificate) is exit 3: {}", String::from_utf8_lossy(&without.stderr));
    assert!(String::from_utf8_lossy(&without.stderr).contains("certificate"), "the cause is named: {}", String::from_utf8_lossy(&without.stderr));
    let missing = cli([base, vec!["--ca-file".into(), "/nonexistent/ca.pem".into()]].concat(), vec![]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--ca-file /nonexistent/ca.pem"), "{}", String::from_utf8_lossy(&missing.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ca_file_requires_a_client_certificate_from_that_ca_on_every_connection() {
    let clients = Authority::new("credbroker clients CA");
    let client_files = common::temp_dir();
    std::fs::write(client_files.0.join("clients-ca.pem"), clients.pem()).unwrap();
    let (app, authority) = spawn_tls(&format!("client_ca_file = \"{}\"\n", client_files.0.join("clients-ca.pem").display())).await;

    let (certificate, key) = clients.issue("security-oncall", ExtendedKeyUsagePurpose::ClientAuth);
    let identity = reqwest::Identity::from_pem(format!("{certificate}{key}").as_bytes()).unwrap();
    let with_certificate = client_trusting(&authority).identity(identity).build().unwrap();
    let response = with_certificate.get(format!("{}/healthz", app.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = with_certificate
        .post(format!("{}/v1/credentials", app.url))
        .bearer_auth(app.issuer.token())
        .json(&json!({"role": "orders-producer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // No certificate, or one from another CA: no HTTP at all.
    let anonymous = client_trusting(&authority).build().unwrap();
    assert!(anonymous.get(format!("{}/healthz", app.url)).send().await.is_err());
    let stranger = Authority::new("somebody else");
    let (certificate, key) = stranger.issue("intruder", ExtendedKeyUsagePurpose::ClientAuth);
    let intruder =
        client_trusting(&authority).identity(reqwest::Identity::from_pem(format!("{certificate}{key}").as_bytes()).unwrap()).build().unwrap();
    assert!(intruder.get(format!("{}/healthz", app.url)).send().await.is_err());

    // curl with the client certificate.
    let (certificate, key) = clients.issue("curl", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(client_files.0.join("curl.pem"), certificate).unwrap();
    std::fs::write(client_files.0.join("curl.key"), key).unwrap();
    let curl = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(app.dir.0.join("ca.pem"))
        .arg("--cert")
        .arg(client_files.0.join("curl.pem"))
        .arg("--key")
        .arg(client_files.0.join("curl.key"))
        .arg(format!("{}/healthz", app.url))
        .output()
        .unwrap();
    assert!(curl.status.success(), "{}", String::from_utf8_lossy(&curl.stderr));

    // The CLI, with --client-cert (certificate and key in one PEM file), and without.
    let (certificate, key) = clients.issue("ci-job", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(client_files.0.join("cli.pem"), format!("{certificate}{key}")).unwrap();
    let cli = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["exchange", "--url", &app.url, "--role", "orders-producer", "--ca-file"])
            .arg(app.dir.0.join("ca.pem"))
            .args(extra)
            .env("CREDBROKER_ID_TOKEN", app.issuer.token())
            .env_remove("CREDBROKER_CLIENT_CERT")
            .output()
            .unwrap()
    };
    let with_certificate = cli(&["--client-cert", client_files.0.join("cli.pem").to_str().unwrap()]);
    assert!(with_certificate.status.success(), "{}", String::from_utf8_lossy(&with_certificate.stderr));
    assert!(String::from_utf8_lossy(&with_certificate.stdout).contains("export KAFKA_OAUTHBEARER_TOKEN='"));
    assert_eq!(cli(&[]).status.code(), Some(3), "no client certificate, no connection");
}

/// Builds (not runs) a broker from `tables` on `listener`; the error text when it refuses.
async fn build_error(listener: tokio::net::TcpListener, extra: &str, tables: &str) -> Option<String> {
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
    let database_url = common::fresh_database().await;
    let text = common::config_text_with_tables("https://gitlab.example.com", &database_url, "http://127.0.0.1:8080", extra, tables);
    let path = dir.0.join("credbroker.toml");
    let config = Config::parse(&text, &path, std::iter::empty()).unwrap();
    let authority = Authority::new("refusals");
    write_server_files(&dir.0, &authority);
    std::fs::write(dir.0.join("empty.pem"), "").unwrap();
    Application::build_on(listener, config, ServeOptions::default()).await.err().map(|error| format!("{error:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_a_non_loopback_address_is_refused_unless_allow_plaintext_says_a_proxy_terminates_tls() {
    let everywhere = || async { tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap() };
    let error = build_error(everywhere().await, "", "").await.expect("plain HTTP on 0.0.0.0 must be refused");
    assert!(error.contains("key `listen`"), "{error}");
    assert!(error.contains("[tls]") && error.contains("allow_plaintext = true"), "{error}");
    assert_eq!(build_error(everywhere().await, "allow_plaintext = true", "").await, None);
    assert_eq!(build_error(everywhere().await, "", TLS_TABLE).await, None);
    // Loopback stays plaintext-friendly for development.
    assert_eq!(build_error(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), "", "").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_unusable_tls_file_fails_startup_naming_its_key() {
    let loopback = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let cases = [
        ("[tls]\ncert_file = \"missing.pem\"\nkey_file = \"server.key\"\n", "key `tls.cert_file`"),
        ("[tls]\ncert_file = \"server.pem\"\nkey_file = \"missing.key\"\n", "key `tls.key_file`"),
        // A certificate file is no key.
        ("[tls]\ncert_file = \"server.pem\"\nkey_file = \"server.pem\"\n", "key `tls.key_file`"),
        ("[tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\nclient_ca_file = \"missing-ca.pem\"\n", "key `tls.client_ca_file`"),
        // An empty CA file holds no certificate.
        ("[tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\nclient_ca_file = \"empty.pem\"\n", "key `tls.client_ca_file`"),
    ];
    for (table, key) in cases {
        let error = build_error(loopback().await, "", table).await.unwrap_or_else(|| panic!("{table} must fail"));
        assert!(error.contains(key), "{table}: {error}");
    }
}

/// The server certificate a fresh connection is shown, and that connection.
async fn connect(url: &str, authority_pem: &str) -> (Vec<u8>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(pem_der(authority_pem))).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let address = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let stream =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (presented, stream)
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// One keep-alive HTTP/1.1 request on an open connection; the status line.
async fn get_on(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    // /healthz answers with a small body and a Content-Length; read until it is all in.
    loop {
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(read > 0, "the connection was closed");
        response.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length: ").map(|n| n.trim().parse().unwrap()))
                .unwrap_or(0);
            if body.len() >= length {
                return head.lines().next().unwrap().to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let dir = common::temp_dir();
    let first = Authority::new("first CA");
    write_server_files(&dir.0, &first);
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
    let port = common::moto::free_port();
    let url = format!("https://127.0.0.1:{port}");
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, common::config_text_with_tables(&issuer.url, &database_url, &url, "", TLS_TABLE)).unwrap();
    let log = dir.0.join("broker.log");
    let broker = common::start_binary_at(&config, &url, &log, &client_trusting(&first).build().unwrap(), &[]).await;

    let (before, mut open) = connect(&url, &first.pem()).await;
    assert_eq!(get_on(&mut open).await, "HTTP/1.1 200 OK");

    // A new certificate from another CA, then SIGHUP.
    let second = Authority::new("second CA");
    write_server_files(&dir.0, &second);
    unsafe { libc::kill(broker.0.id() as i32, libc::SIGHUP) };
    common::eventually("the new certificate is served", std::time::Duration::from_secs(10), async || {
        let client = client_trusting(&second).build().unwrap();
        client.get(format!("{url}/healthz")).send().await.is_ok_and(|response| response.status() == 200)
    })
    .await;
    let (after, _) = connect(&url, &second.pem()).await;
    assert_ne!(before, after);
    assert!(std::fs::read_to_string(&log).unwrap().contains("TLS certificate reloaded on SIGHUP"));

    // The connection made before the reload carries on with its session.
    assert_eq!(get_on(&mut open).await, "HTTP/1.1 200 OK");

    // A broken file on the next SIGHUP keeps the certificate serving now.
    std::fs::write(dir.0.join("server.key"), "not a key").unwrap();
    unsafe { libc::kill(broker.0.id() as i32, libc::SIGHUP) };
    common::eventually("the failed reload is logged", std::time::Duration::from_secs(10), async || {
        std::fs::read_to_string(&log).unwrap().contains("TLS reload on SIGHUP failed")
    })
    .await;
    let (still, _) = connect(&url, &second.pem()).await;
    assert_eq!(still, after);
}
