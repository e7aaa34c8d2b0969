//! The OpenAPI document (`src/http/openapi.json`, served at `/openapi.json`) against the code:
//! every route of the router is documented and every documented path is routed (the `/audit`
//! page and its assets aside), every problem code is documented under the status it always
//! comes with, the audit row's columns and filters are the document's, and schemathesis finds
//! no 5xx and no response outside the document when it fuzzes a live broker with valid and
//! invalid tokens.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

fn document() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::repo_path("src/http/openapi.json")).unwrap()).expect("openapi.json is JSON")
}

/// The `/audit` page, its session and assets are HTML for people, not part of the contract.
fn is_audit_page(path: &str) -> bool {
    path == "/audit" || path.starts_with("/audit/")
}

/// `(method, path)` of every `.route("path", method(..).method(..))` call in `source`.
fn routes_in(source: &str, file: &Path) -> BTreeSet<(String, String)> {
    assert!(!source.contains(".nest("), "{}: nested routers have a prefix this scan does not apply; teach it", file.display());
    let mut routes = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(end, _)| end)
            .unwrap_or_else(|| panic!("{}: unbalanced .route(", file.display()));
        let arguments = &rest[..end];
        let path = arguments
            .trim_start()
            .strip_prefix('"')
            .and_then(|quoted| quoted.split_once('"'))
            .map(|(path, _)| path)
            .unwrap_or_else(|| panic!("{}: a .route( whose path is not a string literal: {arguments}", file.display()));
        let mut methods = 0;
        for method in METHODS {
            let call = format!("{method}(");
            let called = arguments.match_indices(&call).any(|(at, _)| !arguments[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'));
            if called {
                routes.insert((method.to_owned(), path.to_owned()));
                methods += 1;
            }
        }
        assert!(methods > 0, "{}: no method found for route {path}", file.display());
    }
    routes
}

/// Every route `crate::http::app` serves, read from the source of `src/http` (the `/audit`
/// page's own router aside; `/metrics` moves to `metrics_listen` when that is set).
fn router_routes() -> BTreeSet<(String, String)> {
    fn scan(dir: &Path, routes: &mut BTreeSet<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "audit_page") {
                    scan(&path, routes);
                }
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                routes.extend(routes_in(&std::fs::read_to_string(&path).unwrap(), &path));
            }
        }
    }
    let mut routes = BTreeSet::new();
    scan(&common::repo_path("src/http"), &mut routes);
    routes.retain(|(_, path)| !is_audit_page(path));
    routes
}

fn documented_routes(document: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_route_is_documented_and_every_documented_path_is_routed() {
    let document = document();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"), "info.version follows Cargo.toml");
    let routed = router_routes();
    let documented = documented_routes(&document);
    assert!(routed.contains(&("post".into(), "/v1/credentials".into())), "the scan finds the router: {routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from src/http/openapi.json: {undocumented:?}");
    assert!(unrouted.is_empty(), "documented in src/http/openapi.json but not routed: {unrouted:?}");
    assert!(documented.iter().all(|(_, path)| !is_audit_page(path)), "the /audit page is not part of the contract");
}

/// `"text"` of every `Enum::Variant => "text"` arm in `source`: the codes `ErrorCode::as_str`
/// spells, a match the compiler keeps exhaustive.
fn error_codes() -> BTreeMap<String, String> {
    let source = std::fs::read_to_string(common::repo_path("src/types.rs")).unwrap();
    let mut codes = BTreeMap::new();
    for line in source.lines() {
        let Some((variant, text)) = line.trim().strip_prefix("ErrorCode::").and_then(|arm| arm.split_once(" => \"")) else { continue };
        if let Some((text, _)) = text.split_once('"') {
            codes.insert(variant.to_owned(), text.to_owned());
        }
    }
    assert!(codes.len() >= 17, "the scan finds ErrorCode::as_str: {codes:?}");
    codes
}

/// The status `src/http/problem.rs` gives each code (by variant), read from its `status` match.
fn statuses() -> BTreeMap<String, u16> {
    let source = std::fs::read_to_string(common::repo_path("src/http/problem.rs")).unwrap();
    let body = source.split_once("pub fn status(code: ErrorCode) -> StatusCode {").expect("fn status in problem.rs").1;
    let body = &body[..body.find("\n}\n").expect("the end of fn status")];
    let mut statuses = BTreeMap::new();
    let mut pending = Vec::new();
    for token in body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if let Some(variant) = token.strip_prefix("ErrorCode::") {
            pending.push(variant.to_owned());
        } else if let Some(name) = token.strip_prefix("StatusCode::") {
            let status = (100..600)
                .filter_map(|code| http::StatusCode::from_u16(code).ok())
                .find(|status| status.canonical_reason().is_some_and(|reason| reason.to_ascii_uppercase().replace([' ', '-'], "_") == name))
                .unwrap_or_else(|| panic!("StatusCode::{name} has no canonical reason"));
            statuses.extend(pending.drain(..).map(|variant| (variant, status.as_u16())));
        }
    }
    statuses
}

fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("only local references: {reference}"));
            resolve(document, document.pointer(pointer).unwrap_or_else(|| panic!("dangling reference {reference}")))
        }
        None => value,
    }
}

/// The codes a problem schema allows (`code` as `const` or `enum`, directly or in `allOf`).
fn problem_codes(document: &Value, schema: &Value) -> Option<BTreeSet<String>> {
    let schema = resolve(document, schema);
    if let Some(parts) = schema["allOf"].as_array() {
        return parts.iter().find_map(|part| problem_codes(document, part));
    }
    let code = &schema["properties"]["code"];
    match (code.get("const"), code["enum"].as_array()) {
        (Some(one), _) => Some(BTreeSet::from([one.as_str().unwrap().to_owned()])),
        (None, Some(many)) => Some(many.iter().map(|code| code.as_str().unwrap().to_owned()).collect()),
        (None, None) => None,
    }
}

#[test]
fn every_problem_code_is_documented_under_its_status() {
    let document = document();
    let codes = error_codes();
    let statuses = statuses();
    let status_of: BTreeMap<&str, u16> = codes.iter().map(|(variant, text)| (text.as_str(), statuses[variant])).collect();
    assert_eq!(statuses.len(), codes.len(), "problem.rs gives every code a status");

    let catalogue: BTreeSet<&str> =
        document["components"]["schemas"]["ErrorCode"]["enum"].as_array().unwrap().iter().map(|code| code.as_str().unwrap()).collect();
    assert_eq!(catalogue, status_of.keys().copied().collect(), "components.schemas.ErrorCode lists exactly types::ErrorCode");

    let mut used = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let response = resolve(&document, response);
                for (media_type, content) in response["content"].as_object().into_iter().flatten() {
                    if media_type != "application/problem+json" {
                        continue;
                    }
                    let where_ = format!("{method} {path} {status}");
                    let codes =
                        problem_codes(&document, &content["schema"]).unwrap_or_else(|| panic!("{where_}: name the problem codes it can have"));
                    for code in codes {
                        let expected = status_of.get(code.as_str()).unwrap_or_else(|| panic!("{where_}: {code} is no ErrorCode"));
                        assert_eq!(status, &expected.to_string(), "{where_}: {code} always comes with {expected}");
                        used.insert(code);
                    }
                }
            }
        }
    }
    let undocumented: Vec<_> = catalogue.iter().filter(|code| !used.contains(**code)).collect();
    assert!(undocumented.is_empty(), "codes no operation documents: {undocumented:?}");
}

#[test]
fn the_audit_row_and_its_filters_are_the_documents() {
    let document = document();
    let schemas = &document["components"]["schemas"];
    let documented: BTreeSet<&str> = schemas["AuditRecord"]["properties"].as_object().unwrap().keys().map(String::as_str).collect();
    let columns: BTreeSet<&str> = credbroker::audit::RECORD_FIELDS.iter().copied().chain(["claims"]).collect();
    assert_eq!(documented, columns, "components.schemas.AuditRecord has every column of src/audit/record.rs");
    let decisions: Vec<&str> =
        schemas["AuditRecord"]["properties"]["decision"]["enum"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(decisions, credbroker::audit::query::DECISIONS);

    let parameters: BTreeSet<&str> = document["paths"]["/v1/issuances"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|parameter| parameter["in"] == "query")
        .map(|parameter| parameter["name"].as_str().unwrap())
        .collect();
    let filters: BTreeSet<&str> = credbroker::audit::query::FILTERS.iter().copied().chain(["limit", "cursor"]).collect();
    assert_eq!(parameters, filters, "GET /v1/issuances documents every filter");
}

#[tokio::test]
async fn the_broker_serves_the_document_byte_for_byte() {
    let app = common::TestApp::spawn().await;
    let response = app.client.get(format!("{}/openapi.json", app.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.bytes().await.unwrap();
    let file = std::fs::read(common::repo_path("src/http/openapi.json")).unwrap();
    assert!(served == file, "GET /openapi.json differs from src/http/openapi.json");
}

/// axum answers a path parameter that is not UTF-8 once percent-decoded in plain text; the
/// broker answers it as the document says, problem+json. (schemathesis only sends valid UTF-8.)
#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_is_refused_as_documented() {
    let app = common::TestApp::spawn().await;
    let requests = [
        app.client.delete(format!("{}/v1/credentials/%FF", app.url)),
        app.client.get(format!("{}/v1/issuances/%FF", app.url)),
        app.client.post(format!("{}/v1/hooks/gogs/%FF", app.url)),
    ];
    for request in requests {
        let response = request.send().await.unwrap();
        let url = response.url().clone();
        assert_eq!(response.status(), 400, "{url}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{url}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request", "{url}: {problem}");
    }
}

/// Admins and auditors are the test issuer's platform/orders jobs, so the valid token also
/// reaches the admin and audit endpoints' success paths.
const CALLERS: &str = r#"
[admins]
issuer = "gitlab"
[admins.claims]
project_path = "platform/orders"

[auditors]
issuer = "gitlab"
[auditors.claims]
project_path = "platform/orders"
"#;

/// schemathesis (PyPI; scripts/test.sh installs it) against the real binary in dev mode (so the
/// `/dev` routes exist), with Gogs webhooks configured: once with a valid token (a job the
/// policies let exchange, revoke, freeze, reload and read the log), once with the same token's
/// signature broken. Bounded and seeded, so a run is short and repeatable.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_document() {
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), common::POLICIES).unwrap();
    std::fs::write(dir.0.join("policies/callers.toml"), CALLERS).unwrap();
    std::fs::write(dir.0.join("gogs-secret"), "hook secret").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let tables = r#"
[dev]
state_dir = "state"

[gogs]
signing_key_file = "state/gogs.pem"

[gogs.hooks.warehouse]
secret = { file = "gogs-secret" }
repositories = ["platform/*"]
respond_with_token = true
"#;
    // Every exchange the fuzzer makes spends a use of the token; plenty keep the success path open.
    let text = common::config_text_with_tables(&issuer.url, &database_url, &url, "max_uses_per_token = 100000", tables);
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.0.join("broker.log");
    let _broker = common::start_binary_at(&config, &url, &log, &reqwest::Client::new(), &["--dev"]).await;

    // A real credential, so the fuzzer can also look up, revoke and release one that exists.
    let valid = issuer.token();
    let exchange =
        reqwest::Client::new().post(format!("{url}/v1/credentials")).bearer_auth(&valid).json(&serde_json::json!({"role": "orders-producer"}));
    let issued: Value = exchange.send().await.unwrap().json().await.unwrap();
    let issuance_id = issued["issuance_id"].as_str().unwrap_or_else(|| panic!("{issued}")).to_owned();
    let (signed, signature) = valid.rsplit_once('.').unwrap();
    let broken = format!("{signed}.{}", signature.chars().rev().collect::<String>());
    let mut failures = Vec::new();
    for (label, token) in [("valid token", valid), ("invalid token", broken)] {
        let (dir, url, issuance_id) = (dir.0.clone(), url.clone(), issuance_id.clone());
        let output = tokio::task::spawn_blocking(move || schemathesis(&dir, &url, &token, &issuance_id)).await.unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            failures.push(format!("schemathesis with a {label} failed:\n{report}"));
        }
    }
    assert!(failures.is_empty(), "{}\nbroker log: {}", failures.join("\n"), std::fs::read_to_string(&log).unwrap_or_default());
}

/// Values the fuzzer mixes into what it generates, half the time: the policy's roles, the
/// configured hook, a real issuance; and the run's token in every token request's form (where
/// it can only come from here). Without them nearly every case would stop at the first check,
/// and the success paths would go unchecked.
fn schemathesis_config(token: &str, issuance_id: &str) -> String {
    let mut config = format!(
        "[dictionaries]\nroles = {{ values = [\"orders-producer\", \"orders-multi\"] }}\nhooks = {{ values = [\"warehouse\"] }}\n\
         issuances = {{ values = [\"{issuance_id}\"] }}\n\n[parameters]\n"
    );
    for (parameter, dictionary) in [("body.role", "roles"), ("path.hook", "hooks"), ("path.issuance_id", "issuances"), ("body.issuance", "issuances")]
    {
        config.push_str(&format!("\"{parameter}\" = {{ dictionary = \"{dictionary}\", probability = 0.5 }}\n"));
    }
    config.push_str(&format!(
        "\n[[operations]]\ninclude-operation-id = \"oauthToken\"\nparameters = {{ \"body.assertion\" = \"{token}\", \"body.subject_token\" = \"{token}\", \
         \"body.scope\" = {{ dictionary = \"roles\", probability = 0.5 }} }}\n"
    ));
    config
}

/// One bounded, seeded schemathesis run against `{url}/openapi.json`, every request with
/// `Authorization: Bearer {token}`. Blocking.
fn schemathesis(dir: &Path, url: &str, token: &str, issuance_id: &str) -> std::process::Output {
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, schemathesis_config(token, issuance_id)).unwrap();
    Command::new("python3")
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .args(["run", &format!("{url}/openapi.json")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--max-examples", "30", "--seed", "16", "--generation-database", "none", "--no-color", "--continue-on-failure"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("python3 -m schemathesis.cli (scripts/test.sh installs schemathesis)")
}
