//! Load generator for `bench/issuance`: GitLab-shaped job tokens in, Kafka credentials out.
//!
//! Two commands:
//! - `serve-issuer --key K.pem --listen ADDR --issuers N`: an OIDC issuer (discovery + JWKS)
//!   under `/i01` .. `/iNN`, all signing with one RSA key, for the broker to trust.
//! - `run --url BROKER --issuer URL --key K.pem ...`: N keep-alive connections exchanging job
//!   tokens for the measured duration; prints one JSON line of results. `--url` may list
//!   several comma-separated brokers (replicas): connections are spread over them. With
//!   `--kind openbao-jwt-login` the same tokens go to OpenBao's JWT auth login instead
//!   (`--roles` then names OpenBao roles), the way a team using Vault for this job would log in.
//!   With `--kind openbao-database-creds --vault-token T` each request reads
//!   `database/creds/ROLE` from OpenBao directly (`--roles` names database roles): the cost of a
//!   database user minted by OpenBao itself, beside credbroker's `vault_database` backend.
//!   `--ids-file F` writes the `issuance_id` of every 200 (the fault run checks each has its
//!   row). `--slow-file F` writes each measured request slower than `--slow-micros` (default
//!   1000) as `unix_ms latency_us` (when it began, in Unix milliseconds): when in a run the tail
//!   happens, to lay beside the broker's and Postgres' logs.
//!   A connection that fails (a replica killed) counts as status 0 and reconnects.
//!
//! The HTTP client is a minimal HTTP/1.1 writer/reader on a single-threaded runtime, so the
//! generator costs little CPU on the machine it shares with the broker and Postgres.
//! GitLab signs with RS256, and signing costs about a millisecond; so that the generator does
//! not burn a core on signing, each token is reused up to `--uses-per-token` times (the bench
//! policy allows that many uses per role), and tokens are signed ahead of use on a thread of
//! their own ([`Minter`]). Verification, replay claims and audit rows cost the broker exactly
//! what they cost with fresh tokens.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let Some(command) = args.first() else { usage() };
    let options = Options::parse(&args[1..]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match command.as_str() {
        "serve-issuer" => runtime.block_on(serve_issuer(options)),
        "run" => runtime.block_on(run(options)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: loadgen serve-issuer --key K --listen ADDR [--issuers N]");
    eprintln!(
        "       loadgen run --url URL[,URL..] --issuer ISS --key K --audience A --roles R1,R2 [--connections N] [--duration S] [--warmup S] \\
         [--uses-per-token N] [--kind credbroker|openbao-jwt-login|openbao-database-creds] [--vault-token T] [--ids-file F] \\
         [--slow-file F] [--slow-micros N]"
    );
    std::process::exit(2)
}

struct Options(Vec<(String, String)>);

impl Options {
    fn parse(args: &[String]) -> Self {
        let pairs = args
            .chunks(2)
            .map(|pair| match pair {
                [flag, value] if flag.starts_with("--") => (flag[2..].to_owned(), value.clone()),
                _ => usage(),
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(flag, _)| flag == name).map(|(_, value)| value.as_str())
    }

    fn required(&self, name: &str) -> &str {
        self.get(name).unwrap_or_else(|| {
            eprintln!("loadgen: --{name} is required");
            usage()
        })
    }

    fn number(&self, name: &str, default: u64) -> u64 {
        self.get(name).map_or(default, |value| value.parse().unwrap_or_else(|_| usage()))
    }
}

fn signing_key(path: &str) -> (EncodingKey, Jwk) {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let key = EncodingKey::from_rsa_pem(&pem).expect("an RSA private key in PEM");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(jwk.thumbprint(ThumbprintHash::SHA256));
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
    (key, jwk)
}

async fn serve_issuer(options: Options) {
    use axum::extract::{Path, State};
    use axum::routing::get;
    use axum::{Json, Router};

    let (_, jwk) = signing_key(options.required("key"));
    let listen: SocketAddr = options.required("listen").parse().expect("--listen ADDR");
    let base = format!("http://{listen}");
    let jwks = json!({ "keys": [jwk] });
    let app = Router::new()
        .route("/jwks.json", get(move || async move { Json(jwks) }))
        .route(
            "/{issuer}/.well-known/openid-configuration",
            get(|State(base): State<String>, Path(issuer): Path<String>| async move {
                Json(json!({
                    "issuer": format!("{base}/{issuer}"),
                    "jwks_uri": format!("{base}/jwks.json"),
                    "authorization_endpoint": format!("{base}/{issuer}/authorize"),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }))
            }),
        )
        .with_state(base);
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind --listen");
    axum::serve(listener, app).await.unwrap();
}

/// Mints GitLab-shaped job tokens on a thread of its own, one ahead for each connection: RS256
/// signing costs about a millisecond, and done on the generator's event loop it would stall
/// every connection at once (all 64 reach their 1,000th use together), adding the
/// generator's own pauses to the latencies it measures.
struct Minter {
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
}

impl Minter {
    /// Starts the thread; connection `c` takes its tokens from the `c`th receiver.
    fn start(self, connections: usize) -> (std::sync::mpsc::Sender<usize>, Vec<tokio::sync::mpsc::UnboundedReceiver<String>>) {
        let (wants, wanted) = std::sync::mpsc::channel::<usize>();
        let (ready, receivers): (Vec<_>, Vec<_>) = (0..connections).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        // Each connection's first token, then one ahead: asked for whenever one is taken.
        for connection in (0..connections).chain(0..connections) {
            wants.send(connection).expect("the minter's queue is open");
        }
        std::thread::spawn(move || {
            for (minted, connection) in wanted.into_iter().enumerate() {
                // A connection that finished has dropped its receiver; the others still want theirs.
                let _ = ready[connection].send(self.mint(connection, minted));
            }
        });
        (wants, receivers)
    }

    /// A GitLab CI id_token's claims (see REFERENCE.md), with a fresh jti each time.
    fn mint(&self, connection: usize, serial: usize) -> String {
        let now = time_now();
        let claims = json!({
            "iss": self.issuer, "aud": self.audience,
            "sub": "project_path:bench/app:ref_type:branch:ref:main",
            "iat": now, "nbf": now, "exp": now + 3600,
            "jti": format!("bench-{}-{connection}-{serial}", std::process::id()),
            "namespace_id": "7", "namespace_path": "bench", "project_id": "42", "project_path": "bench/app",
            "user_id": "5", "user_login": "bench-bot", "user_email": "bench@example.com",
            "user_access_level": "developer", "pipeline_id": "1001", "pipeline_source": "push",
            "job_id": format!("{}", 5000 + connection), "ref": "main", "ref_type": "branch",
            "ref_path": "refs/heads/main", "ref_protected": "true",
            "sha": "4ee8a0c5a5cfbc3e7a4f3b2a6fbd1f0c9e8d7c6b", "project_visibility": "private",
            "runner_id": 17, "runner_environment": "self-hosted",
            "job_project_path": "bench/app", "job_project_id": "42",
        });
        jsonwebtoken::encode(&self.header, &claims, &self.key).unwrap()
    }
}

/// One connection's tokens: each used `uses_per_token` times, the next already minted.
struct Tokens {
    connection: usize,
    ready: tokio::sync::mpsc::UnboundedReceiver<String>,
    wants: std::sync::mpsc::Sender<usize>,
    uses_per_token: u64,
    current: String,
    uses: u64,
    /// Tokens taken so far by this connection.
    taken: usize,
}

impl Tokens {
    /// The token to send next, and its number on this connection.
    async fn next(&mut self) -> (usize, &str) {
        if self.current.is_empty() || self.uses >= self.uses_per_token {
            self.current = self.ready.recv().await.expect("the minter runs as long as the generator");
            let _ = self.wants.send(self.connection);
            self.uses = 0;
            self.taken += 1;
        }
        self.uses += 1;
        (self.taken, &self.current)
    }
}

fn time_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[derive(Default)]
struct Tally {
    /// Status 0: the connection failed (refused, reset, closed mid-response).
    statuses: std::collections::BTreeMap<u16, u64>,
    latencies_micros: Vec<u32>,
    /// The `issuance_id` of each 200, when asked for (`--ids-file`).
    issuance_ids: Vec<String>,
    /// The problem `code` of each other response that has one.
    codes: std::collections::BTreeMap<String, u64>,
    /// Requests slower than `--slow-micros`, when asked for (`--slow-file`): when each began,
    /// in milliseconds from the generator's start, and its latency in microseconds.
    slow: Vec<(u64, u32)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `POST /v1/credentials` with the job token as bearer token.
    Credbroker,
    /// `POST /v1/auth/jwt/login` with `{"role", "jwt"}`: OpenBao's (and Vault's) JWT auth.
    OpenbaoJwtLogin,
    /// `GET /v1/database/creds/ROLE` with `X-Vault-Token`: OpenBao's database engine.
    OpenbaoDatabaseCreds,
}

async fn run(options: Options) {
    let addresses: Vec<SocketAddr> = options
        .required("url")
        .split(',')
        .map(|url| url.trim_start_matches("http://").trim_end_matches('/').parse().expect("--url http://IP:PORT[,http://IP:PORT..]"))
        .collect();
    let kind = match options.get("kind").unwrap_or("credbroker") {
        "credbroker" => Kind::Credbroker,
        "openbao-jwt-login" => Kind::OpenbaoJwtLogin,
        "openbao-database-creds" => Kind::OpenbaoDatabaseCreds,
        _ => usage(),
    };
    let ids_file = options.get("ids-file").map(str::to_owned);
    let slow_file = options.get("slow-file").map(str::to_owned);
    let connections = options.number("connections", 16) as usize;
    let duration = Duration::from_secs(options.number("duration", 10));
    let warmup = Duration::from_secs(options.number("warmup", 2));
    let roles: Vec<String> = options.required("roles").split(',').map(str::to_owned).collect();
    let (key, jwk) = signing_key(options.required("key"));
    let mut header = Header::new(Algorithm::RS256);
    header.kid = jwk.common.key_id.clone();
    header.typ = Some("JWT".into());

    let minter = Minter { key, header, issuer: options.required("issuer").to_owned(), audience: options.required("audience").to_owned() };
    let (wants, ready) = minter.start(connections);

    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::new();
    for (connection, ready) in ready.into_iter().enumerate() {
        let tokens = Tokens {
            connection,
            ready,
            wants: wants.clone(),
            uses_per_token: options.number("uses-per-token", 1000),
            current: String::new(),
            uses: 0,
            taken: 0,
        };
        let roles = roles.clone();
        let target = Target {
            address: addresses[connection % addresses.len()],
            kind,
            keep_ids: ids_file.is_some(),
            slow_micros: slow_file.as_ref().map(|_| options.number("slow-micros", 1000) as u32),
            vault_token: options.get("vault-token").unwrap_or_default().to_owned(),
        };
        tasks.push(tokio::spawn(connection_loop(target, tokens, roles, connection, start, measure_from, stop_at)));
    }
    let mut measured = Tally::default();
    let mut ok_total = 0;
    for task in tasks {
        let (tally, ok_all) = task.await.unwrap();
        ok_total += ok_all;
        for (status, count) in tally.statuses {
            *measured.statuses.entry(status).or_default() += count;
        }
        measured.latencies_micros.extend(tally.latencies_micros);
        measured.issuance_ids.extend(tally.issuance_ids);
        measured.slow.extend(tally.slow);
        for (code, count) in tally.codes {
            *measured.codes.entry(code).or_default() += count;
        }
    }
    if let Some(path) = ids_file {
        let mut text = measured.issuance_ids.join("\n");
        text.push('\n');
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
    if let Some(path) = slow_file {
        measured.slow.sort_unstable();
        let started_ms = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap() - start.elapsed()).as_millis() as u64;
        let text: String = measured.slow.iter().map(|(offset_ms, latency)| format!("{} {latency}\n", started_ms + offset_ms)).collect();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
    measured.latencies_micros.sort_unstable();
    let percentile = |p: f64| {
        let latencies = &measured.latencies_micros;
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[index]) / 1000.0
    };
    let ok = measured.statuses.get(&200).copied().unwrap_or(0);
    let statuses: serde_json::Map<String, Value> = measured.statuses.iter().map(|(status, count)| (status.to_string(), json!(count))).collect();
    println!(
        "{}",
        json!({
            "connections": connections,
            "duration_seconds": duration.as_secs_f64(),
            "ok": ok,
            "ok_including_warmup": ok_total,
            "statuses": statuses,
            "codes": measured.codes,
            "requests_per_second": ok as f64 / duration.as_secs_f64(),
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
        })
    );
}

struct Target {
    address: SocketAddr,
    kind: Kind,
    keep_ids: bool,
    /// Record the requests slower than this (`--slow-file`).
    slow_micros: Option<u32>,
    vault_token: String,
}

/// One keep-alive connection: request, wait for the whole response, repeat. Stops between
/// requests, never in the middle of one, so every 200 counted is a complete exchange. Counts
/// (warm-up included) every 200 and, with `keep_ids`, the issuance id each one carried.
async fn connection_loop(
    target: Target,
    mut tokens: Tokens,
    roles: Vec<String>,
    connection: usize,
    start: Instant,
    measure_from: Instant,
    stop_at: Instant,
) -> (Tally, u64) {
    let mut stream = None;
    let mut tally = Tally::default();
    let mut ok_total = 0;
    let mut buffer = Vec::with_capacity(16 * 1024);
    let mut request = Vec::with_capacity(4096);
    let mut sent: u64 = 0;
    loop {
        let began = Instant::now();
        if began >= stop_at {
            break;
        }
        // A token keeps one role for all its uses, so a run over many roles counts as many
        // (token, role) uses in Postgres as a run over one: only the policy's size differs.
        let role_of = |token_number: usize| &roles[(connection + token_number) % roles.len()];
        sent += 1;
        request.clear();
        match target.kind {
            Kind::Credbroker => {
                let (token_number, token) = tokens.next().await;
                let body = format!(r#"{{"role":"{}"}}"#, role_of(token_number));
                request
                    .extend_from_slice(b"POST /v1/credentials HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nAuthorization: Bearer ");
                request.extend_from_slice(token.as_bytes());
                request.extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            }
            Kind::OpenbaoJwtLogin => {
                let (token_number, token) = tokens.next().await;
                let body = format!(r#"{{"role":"{}","jwt":"{token}"}}"#, role_of(token_number));
                request.extend_from_slice(b"POST /v1/auth/jwt/login HTTP/1.1\r\nHost: openbao\r\nContent-Type: application/json");
                request.extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            }
            Kind::OpenbaoDatabaseCreds => {
                let role = role_of(sent as usize); // no token: the role turns with each request
                let head = format!("GET /v1/database/creds/{role} HTTP/1.1\r\nHost: openbao\r\nX-Vault-Token: {}\r\n\r\n", target.vault_token);
                request.extend_from_slice(head.as_bytes());
            }
        }
        let outcome = exchange_once(&mut stream, target.address, &request, &mut buffer).await;
        let status = match outcome {
            Ok(status) => status,
            Err(_) => {
                // A replica killed or restarting: count it, and connect again shortly.
                stream = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
                0
            }
        };
        if status == 200 {
            ok_total += 1;
            if target.keep_ids {
                tally.issuance_ids.push(string_field(&buffer, "issuance_id").expect("a 200 without an issuance_id"));
            }
        } else if let Some(code) = string_field(&buffer, "code") {
            *tally.codes.entry(code).or_default() += 1;
        }
        if began >= measure_from {
            *tally.statuses.entry(status).or_default() += 1;
            let latency = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            tally.latencies_micros.push(latency);
            if target.slow_micros.is_some_and(|slow| latency > slow) {
                tally.slow.push(((began - start).as_millis() as u64, latency));
            }
        }
    }
    (tally, ok_total)
}

async fn exchange_once(stream: &mut Option<TcpStream>, address: SocketAddr, request: &[u8], buffer: &mut Vec<u8>) -> std::io::Result<u16> {
    if stream.is_none() {
        let connected = TcpStream::connect(address).await?;
        connected.set_nodelay(true)?;
        *stream = Some(connected);
    }
    let connected = stream.as_mut().expect("connected above");
    connected.write_all(request).await?;
    read_response(connected, buffer).await
}

/// The first `"name":"…"` in the response held in `buffer` (a credential's `issuance_id`, a
/// problem's `code`): the broker writes compact JSON whose string values need no unescaping.
fn string_field(buffer: &[u8], name: &str) -> Option<String> {
    let key = format!("\"{name}\":\"");
    let key = key.as_bytes();
    let start = buffer.windows(key.len()).position(|window| window == key)? + key.len();
    let length = buffer[start..].iter().position(|byte| *byte == b'"')?;
    String::from_utf8(buffer[start..start + length].to_vec()).ok()
}

/// Reads one response (headers plus a Content-Length body) into `buffer` and returns its status.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<u16> {
    let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-response");
    buffer.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).expect("ASCII response head");
            let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                })
                .expect("a Content-Length header");
            while buffer.len() < end + 4 + length {
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    return Err(closed());
                }
                buffer.extend_from_slice(&chunk[..read]);
            }
            return Ok(status);
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(closed());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}
